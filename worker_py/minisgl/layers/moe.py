"""A mixture-of-experts MLP (Qwen3-MoE): a router picks `top_k` experts per token (softmax over all
experts, then the top k, renormalised to sum 1 when the family says so), each expert a gated MLP, the
outputs summed with the routing weights. On CUDA with `fused` the experts run as one grouped kernel
(`kernels.moe.fused_moe`), else through the torch reference. Experts would split across tensor-parallel
ranks by their intermediate dimension (`tp_dim` 1 of gate_up_proj's [E, 2I, H] rows, ...).

Checkpoints name the experts either one by one (`experts.{e}.gate_proj.weight`, ...: see
`expert_shard`) or stacked as transformers 5 saves them (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]), which are the names of the parameters here.
"""

from __future__ import annotations

import re
from collections.abc import Hashable

import torch
from torch import nn

from minisgl.kernels import moe
from minisgl.layers.linear import Linear
from minisgl.layers.loading import ALL, add_param, copy_checked
from minisgl.layers.options import LayerOptions

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def expert_shard(name: str) -> tuple[str, Hashable] | None:
    """`...mlp.experts.3.up_proj.weight` -> (`...mlp.experts.gate_up_proj`, ("up", 3)); None otherwise."""
    m = _PER_EXPERT.search(name)
    if m is None:
        return None
    expert, part = int(m.group(1)), m.group(2)
    stacked = "down_proj" if part == "down_proj" else "gate_up_proj"
    return name[: m.start()] + f".experts.{stacked}", (part.removesuffix("_proj"), expert)


class Experts(nn.Module):
    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, options: LayerOptions
    ) -> None:
        super().__init__()
        if options.tp_size != 1:
            raise NotImplementedError("experts split across ranks come with tensor parallelism")
        e, h, i = num_experts, hidden_size, intermediate_size
        self.intermediate_size = i
        gate_up = tuple((p, x) for x in range(e) for p in ("gate", "up"))
        add_param(self, "gate_up_proj", (e, 2 * i, h), options.dtype, self._load_gate_up, gate_up)
        down = tuple(("down", x) for x in range(e))
        add_param(self, "down_proj", (e, h, i), options.dtype, self._load_down, down)

    def _load_gate_up(self, tensor: torch.Tensor, shard: Hashable) -> None:
        if shard == ALL:
            return copy_checked(self.gate_up_proj.data, tensor, "experts.gate_up_proj")
        part, e = shard
        rows = self.gate_up_proj.data[e].narrow(
            0, 0 if part == "gate" else self.intermediate_size, self.intermediate_size
        )
        copy_checked(rows, tensor, f"expert {e} {part}_proj")

    def _load_down(self, tensor: torch.Tensor, shard: Hashable) -> None:
        if shard == ALL:
            return copy_checked(self.down_proj.data, tensor, "experts.down_proj")
        copy_checked(self.down_proj.data[shard[1]], tensor, f"expert {shard[1]} down_proj")


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        options: LayerOptions,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = Linear(hidden_size, num_experts, options)
        self.experts = Experts(num_experts, hidden_size, intermediate_size, options)
        self._experts = moe.fused_moe if options.fused else moe.moe_reference
        # The reference reads each expert's token count on the host: it cannot run inside a CUDA graph.
        self.capturable = options.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = moe.route(self.gate(x), self.top_k, self.renormalize)
        return self._experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
