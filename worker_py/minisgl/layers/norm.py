"""RMSNorm, with the residual add of the layer before it folded in."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels import norm
from minisgl.layers.loading import add_param, copy_checked
from minisgl.layers.options import LayerOptions


class RMSNorm(nn.Module):
    """`forward(x, residual)` is `(RMSNorm(x + residual), x + residual)`, or `(RMSNorm(x), x)` for the first
    layer: carrying the residual beside the hidden states lets one kernel do each add and the norm after it.
    `normalize(x)` is the plain norm over the last dimension (Qwen3's per-head q/k norm)."""

    def __init__(self, size: int, eps: float, options: LayerOptions) -> None:
        super().__init__()
        self.eps = eps
        add_param(self, "weight", (size,), options.dtype, self._load)
        self._norm = norm.rms_norm if options.fused else norm.rms_norm_reference
        self._add_norm = norm.add_rms_norm if options.fused else norm.add_rms_norm_reference

    def _load(self, tensor: torch.Tensor, _shard: object) -> None:
        copy_checked(self.weight.data, tensor, "norm")

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x, self.weight, self.eps), x
        return self._add_norm(x, residual, self.weight, self.eps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return norm.rms_norm_reference(x, self.weight, self.eps)
