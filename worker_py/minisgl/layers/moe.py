"""A mixture-of-experts MLP (Qwen3-MoE): a router picks `top_k` experts per token (softmax over all
experts, then the top k, renormalised to sum 1 when the family says so), each expert a gated MLP, the
outputs summed with the routing weights. On CUDA with `fused` the experts run as one grouped kernel
(`kernels.moe.fused_moe`), else through the torch reference. With tensor parallelism every rank holds
every expert, each with a slice of its intermediate dimension (gate_up_proj [E, 2I/N, H]: the rank's gate
rows, then its up rows; down_proj [E, H, I/N]), and the experts' summed output is all-reduced: the split of
a dense MLP, so a rank's work does not depend on where the router sends tokens. The router is replicated.

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
from minisgl.layers import comm
from minisgl.layers.linear import Linear
from minisgl.layers.loading import ALL, add_param, copy_checked, rank_slice
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
        self._rank, self._ranks = options.tp_rank, options.tp_size
        e, h, i = num_experts, hidden_size, options.split(intermediate_size, "experts' intermediate size")
        self.intermediate_size = i
        gate_up = tuple((p, x) for x in range(e) for p in ("gate", "up"))
        add_param(self, "gate_up_proj", (e, 2 * i, h), options.dtype, self._load_gate_up, gate_up)
        down = tuple(("down", x) for x in range(e))
        add_param(self, "down_proj", (e, h, i), options.dtype, self._load_down, down)

    def _load_gate_up(self, tensor: torch.Tensor, shard: Hashable) -> None:
        i = self.intermediate_size
        if shard == ALL:
            gate, up = tensor.chunk(2, dim=1)
            dst = self.gate_up_proj.data
            copy_checked(dst.narrow(1, 0, i), self._mine(gate, 1), "experts.gate_up_proj (gate)")
            return copy_checked(dst.narrow(1, i, i), self._mine(up, 1), "experts.gate_up_proj (up)")
        part, e = shard
        rows = self.gate_up_proj.data[e].narrow(0, 0 if part == "gate" else i, i)
        copy_checked(rows, self._mine(tensor, 0), f"expert {e} {part}_proj")

    def _load_down(self, tensor: torch.Tensor, shard: Hashable) -> None:
        if shard == ALL:
            return copy_checked(self.down_proj.data, self._mine(tensor, 2), "experts.down_proj")
        copy_checked(self.down_proj.data[shard[1]], self._mine(tensor, 1), f"expert {shard[1]} down_proj")

    def _mine(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a checkpoint tensor's intermediate dimension `dim`."""
        return rank_slice(tensor, dim, self._rank, self._ranks)


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
        self._reduce = options.tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = moe.route(self.gate(x), self.top_k, self.renormalize)
        out = self._experts(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return comm.all_reduce(out) if self._reduce else out
