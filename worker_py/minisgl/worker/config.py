"""What the worker allocates: the runner's configuration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class RunnerConfig:
    """`num_pages=None` sizes the KV cache from `kv_memory_bytes`, or on CUDA from `kv_memory_fraction` of the
    memory still free once the weights are loaded."""

    model_dir: str
    device: torch.device
    dtype: torch.dtype
    num_pages: int | None
    page_size: int
    max_batch: int
    max_tokens: int
    attention: str = "torch"
    kv_memory_bytes: int | None = None
    kv_memory_fraction: float = 0.85

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.max_batch <= 0 or self.max_tokens <= 0:
            raise ValueError("page_size, max_batch and max_tokens must be positive")
        if self.max_tokens < self.max_batch:
            raise ValueError("max_tokens must allow one token for each of max_batch requests")
