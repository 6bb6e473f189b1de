"""The gated MLP of Llama-style models: down(silu(gate(x)) * up(x)), gate and up as one merged projection
(column parallel), down row parallel."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.layers.linear import Linear
from minisgl.layers.options import LayerOptions


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, options: LayerOptions) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            hidden_size, [intermediate_size] * 2, options, tp_dim=0, shards=("gate", "up")
        )
        self.down_proj = Linear(intermediate_size, hidden_size, options, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x, silu_mul=True))
