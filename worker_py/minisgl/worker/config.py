"""The worker's configuration: one set of names from `minisgl serve`'s flags to the runner, the scheduler's
where it has them (max_batch, max_step_tokens). Importable without torch: the launcher builds its flags
from these fields."""

from __future__ import annotations

from dataclasses import dataclass, replace

from minisgl.attention.registry import DECODE_CHOICES, DEFAULT_GRAPH_CONTEXT, PREFILL_CHOICES
from minisgl.flags import opt
from minisgl.tp import MAX_RANKS

# Accepted names and torch's for each.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
CPU_KV_BYTES = 1 << 30  # on the CPU there is no free-memory probe: 1 GiB of KV cache unless told otherwise


@dataclass(frozen=True)
class WorkerConfig:
    """Every field is a flag of `minisgl serve` and of `python -m minisgl.worker`. `resolved()` decides
    every `auto` and default for the machine it runs on; the runner takes the resolved config."""

    model: str = opt("", "HF checkpoint directory", metavar="DIR")
    device: str = opt("auto", "auto (cuda when torch sees a GPU), cpu, cuda, cuda:N")
    dtype: str = opt("auto", "auto (bfloat16 on cuda, float32 on cpu, where bf16 is slow), or a dtype")
    attention: str = opt(
        "auto",
        "attention backend of extend steps; auto: flashinfer on cuda when installed, else torch",
        choices=PREFILL_CHOICES,
    )
    decode_attention: str = opt(
        "auto",
        "attention backend of decode steps; auto: triton on cuda (torch when --attention is torch)",
        choices=DECODE_CHOICES,
    )
    num_pages: int | None = opt(None, "KV pages (default: from memory; 1 GiB of KV on the CPU)", metavar="N")
    page_size: int = opt(16, "tokens per KV page", metavar="N")
    max_batch: int | None = opt(None, "most requests per step (default: 256 on cuda, 64 on cpu)", metavar="N")
    max_step_tokens: int | None = opt(
        None,
        "most new tokens per step; longer prompts are chunked (default: 8192 on cuda, 2048 on cpu)",
        metavar="N",
    )
    kv_fraction: float = opt(
        0.85, "on cuda: share of the memory left after the weights for the KV cache", metavar="F"
    )
    kv_bytes: int | None = opt(
        None, "KV cache size in bytes (default: from --kv-fraction on cuda)", metavar="N"
    )
    cuda_graphs: bool = opt(True, "decode steps replay captured CUDA graphs")
    fused_kernels: bool = opt(
        True, "Triton kernels: norms, RoPE with the KV write, SiLU-and-mul, MoE, small-batch projections"
    )
    overlap: bool = opt(True, "the scheduler plans step N+1 while the worker runs step N")
    graph_sampling: bool = opt(
        True,
        "decode graphs capture the sampling too (greedy, temperature, top-k/top-p; not the optional passes): "
        "a sampled step's host time at batch 1 goes from 1.3 ms to 0.3 ms (docs/benchmarks.md)",
    )
    extend_graphs: bool = opt(
        True,
        "extend steps of up to 512 tokens replay captured graphs too, as one decode row per new token: no "
        "per-launch host cost for short prompts (docs/architecture.md)",
    )
    token_graph_tokens: int = opt(
        512,
        "extend steps of up to N tokens (at most 512) replay the token-row graphs, one decode row per new "
        "token, when their rows reread few cached keys; 0: off, such steps take the extend graphs",
        metavar="N",
    )
    extend_graph_tokens: int = opt(
        2048,
        "extend steps of up to N tokens that the token-row graphs do not take replay graphs captured at "
        "512, 1024, ... N tokens, with the Triton extend attention kernel; 0: off, such steps run eagerly "
        "(docs/architecture.md)",
        metavar="N",
    )
    decode_graph_context: int = opt(
        DEFAULT_GRAPH_CONTEXT,
        "the context (tokens) a decode graph's attention is split for: the split count that fills the GPU "
        "at N tokens, used for every step the graph replays; at N <= 128 a graph's attention is one kernel "
        "with no split (--decode-attention triton)",
        metavar="N",
    )
    short_graph_context: int = opt(
        0,
        "decode graphs of up to 16 rows get a twin planned for contexts of up to N tokens (at N <= 128 one "
        "attention kernel with no split and no combine), replayed for the steps whose longest context is at "
        "most N; 0: none (--decode-attention triton)",
        metavar="N",
    )
    pdl: bool = opt(
        True,
        "programmatic dependent launch (Hopper and later) in the graphs of small steps: each of our kernels "
        "is scheduled while the one before it still runs, hiding its launch (docs/architecture.md)",
    )
    prefetch_weights: bool = opt(
        False,
        "an experiment: in the graphs of steps of up to 16 rows each small_m projection first asks for its "
        "own weights into L2, before it waits for the kernel before it (docs/benchmarks.md)",
    )
    tp: int = opt(
        1,
        "tensor-parallel ranks: the model is split over N worker processes (on cuda one GPU each, "
        "GPUs 0..N-1 of CUDA_VISIBLE_DEVICES)",
        metavar="N",
    )

    def resolved(self) -> WorkerConfig:
        """This config with `auto` and every machine-dependent default decided."""
        import torch

        from minisgl.attention.registry import resolve

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = device.startswith("cuda")
        prefill, decode = resolve(self.attention, self.decode_attention, "cuda" if on_gpu else "cpu")
        cpu_kv = None if on_gpu or self.num_pages is not None else CPU_KV_BYTES
        return replace(
            self,
            device=device,
            dtype=self.dtype if self.dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            attention=prefill,
            decode_attention=decode,
            max_batch=self.max_batch or (256 if on_gpu else 64),
            max_step_tokens=self.max_step_tokens or (8192 if on_gpu else 2048),
            kv_bytes=self.kv_bytes if self.kv_bytes is not None else cpu_kv,
        )

    def validate(self) -> None:
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"unknown dtype {self.dtype!r}; known: auto, {', '.join(DTYPES)}")
        for name in ("token_graph_tokens", "extend_graph_tokens", "short_graph_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        for name in ("page_size", "max_batch", "max_step_tokens", "num_pages", "tp", "decode_graph_context"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.tp > MAX_RANKS:
            raise ValueError(f"tp must be at most {MAX_RANKS} (the step ring's readers), got {self.tp}")
        if self.tp > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"--device {self.device} names one GPU and --tp {self.tp} needs {self.tp}: give --device "
                "cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if self.max_batch and self.max_step_tokens and self.max_step_tokens < self.max_batch:
            raise ValueError("max_step_tokens must allow one token for each of max_batch requests")

    def __post_init__(self) -> None:
        self.validate()


def parse_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
