"""How layers are built: their dtype, the kernels they run, and the tensor-parallel shard they hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerOptions:
    """`fused`: the Triton kernels of `minisgl.kernels` (norms with the residual add, RoPE with the KV write,
    SiLU-and-mul, the fused MoE) instead of their torch references. `small_m`: projections of at most 16
    rows through `kernels.small_m` where it measured faster (half-precision dtypes only: its tl.dot would
    run float32 through TF32). A layer reads these once, when it is built.

    `tp_rank` of `tp_size`: which shard of each weight this process holds (see `Linear.tp_dim`). Split
    layers talk to the other ranks through `minisgl.layers.comm`, which needs torch.distributed set up."""

    dtype: torch.dtype
    fused: bool = False
    small_m: bool = False
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tensor-parallel rank {self.tp_rank} of {self.tp_size}")
        if self.small_m and self.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError("the small_m kernels are for bfloat16 and float16 only")

    def split(self, size: int, what: str) -> int:
        """This rank's share of `size` along a split dimension."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) does not split evenly over {self.tp_size} ranks")
        return size // self.tp_size
