"""Linear layers that own their weight loading.

One class covers the three shapes a transformer needs: a plain projection, a merged one whose output rows
are several checkpoint tensors side by side (q/k/v, gate/up), and a row-parallel one. `tp_dim` says how the
weight would be split across tensor-parallel ranks: 0 splits the output rows (column parallel: each shard of
a merged weight is split on its own, so every rank keeps whole heads of q, k and v), 1 splits the input
columns (row parallel: the ranks' partial sums are added by an all-reduce, which the layer does itself),
None replicates it. A merged layer may give each shard a split of its own (`parts`): the K and V of a model
with fewer KV heads than ranks are replicated, not split (`minisgl.tp.kv_part`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.kernels import activation, small_m
from minisgl.layers import comm
from minisgl.layers.loading import ALL, add_param, copy_checked, rank_slice
from minisgl.layers.options import LayerOptions


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        options: LayerOptions,
        *,
        bias: bool = False,
        tp_dim: int | None = None,
        shards: Sequence[Hashable] | None = None,
        parts: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """`out_features` as a list makes a merged layer with one named shard per entry (`shards`). With
        `tp_dim` 0, `parts` says which slice of each shard's rows this rank holds, as (index, count)
        (default: (tp_rank, tp_size) for every shard)."""
        super().__init__()
        sizes = [out_features] if isinstance(out_features, int) else list(out_features)
        self.shard_ids = tuple(shards) if shards is not None else (ALL,)
        if len(self.shard_ids) != len(sizes):
            raise ValueError("a merged linear layer needs one shard name per output block")
        o = options
        self.tp_dim, self._rank, self._ranks = tp_dim, o.tp_rank, o.tp_size
        parts = list(parts) if parts is not None else [(o.tp_rank, o.tp_size)] * len(sizes)
        if tp_dim != 0:
            parts = [(0, 1)] * len(sizes)
        self._parts = dict(zip(self.shard_ids, parts, strict=True))
        if tp_dim == 0:
            sizes = [_part_size(s, n, "output features") for s, (_i, n) in zip(sizes, parts, strict=True)]
        elif tp_dim == 1:
            in_features = o.split(in_features, "input features")
        # Row parallel: each rank's product is a partial sum of the output.
        self._reduce = tp_dim == 1 and o.tp_size > 1
        self._offsets = dict(zip(self.shard_ids, _starts(sizes), strict=True))
        self._sizes = dict(zip(self.shard_ids, sizes, strict=True))
        add_param(self, "weight", (sum(sizes), in_features), o.dtype, self._load_weight, self.shard_ids)
        if bias:
            # A row-parallel bias must count once in the all-reduced sum: rank 0 holds it, the others zeros.
            add_param(self, "bias", (sum(sizes),), o.dtype, self._load_bias, self.shard_ids)
        else:
            self.bias = None
        self.small_m = o.small_m
        self._silu_and_mul = activation.silu_and_mul if o.fused else activation.silu_and_mul_reference

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """`x W^T + b`; with `silu_mul` (a [gate; up] layer) `silu(gate) * up` of it."""
        op = small_m.SILU if silu_mul else small_m.LINEAR
        if self.small_m and small_m.suits(x, self.weight, op) and not (silu_mul and self.bias is not None):
            out = small_m.linear(x, self.weight, self.bias, silu_mul=silu_mul)
        else:
            out = F.linear(x, self.weight, self.bias)
            out = self._silu_and_mul(out) if silu_mul else out
        return comm.all_reduce(out) if self._reduce else out

    def _rows(self, dst: torch.Tensor, shard: Hashable) -> torch.Tensor:
        if shard == ALL and len(self.shard_ids) > 1:
            return dst
        return dst.narrow(0, self._offsets[shard], self._sizes[shard])

    def _load_weight(self, tensor: torch.Tensor, shard: Hashable) -> None:
        if shard == ALL and len(self.shard_ids) > 1:
            self._load_merged(tensor, self._load_weight)
            return
        if self.tp_dim == 1:
            src = rank_slice(tensor, 1, self._rank, self._ranks)
        else:
            src = rank_slice(tensor, 0, *self._parts[shard])
        copy_checked(self._rows(self.weight.data, shard), src, f"weight {shard}")

    def _load_bias(self, tensor: torch.Tensor, shard: Hashable) -> None:
        if shard == ALL and len(self.shard_ids) > 1:
            self._load_merged(tensor, self._load_bias)
            return
        if self.tp_dim == 1 and self._rank != 0:
            self.bias.data.zero_()
            return
        src = rank_slice(tensor, 0, *self._parts[shard]) if self.tp_dim == 0 else tensor
        copy_checked(self._rows(self.bias.data, shard), src, f"bias {shard}")

    def _load_merged(self, tensor: torch.Tensor, load) -> None:
        """A checkpoint that stores the merged tensor whole: split it into its blocks, then by rank."""
        full = [size * self._parts[sid][1] for sid, size in self._sizes.items()]
        for sid, block in zip(self.shard_ids, tensor.split(full, dim=0), strict=True):
            load(block, sid)


def _part_size(size: int, count: int, what: str) -> int:
    if size % count:
        raise ValueError(f"{what} ({size}) do not split evenly into {count} parts")
    return size // count


def _starts(sizes: list[int]) -> list[int]:
    starts, at = [], 0
    for s in sizes:
        starts.append(at)
        at += s
    return starts
