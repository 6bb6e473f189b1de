"""Weights that load themselves: the module that owns a parameter keeps, in `module.loaders[name]`, the
function that copies a checkpoint tensor (or one named shard of a merged parameter) into it and the shards
it expects, so that a loader can check that nothing was left uninitialised. (On the module, not on the
parameter: materialising a meta-device model replaces its parameter objects.)

Tensor parallelism lives here too: a parameter's `tp_dim` is the dimension its checkpoint tensor is split
along, one slice per rank (None: every rank holds it whole)."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import nn

ALL = "all"  # the shard id of a checkpoint tensor that fills a merged parameter at once

Loader = Callable[[torch.Tensor, Hashable], None]


def add_param(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    loader: Loader,
    shards: tuple[Hashable, ...] = (ALL,),
) -> None:
    """Registers parameter `name`; `loader(tensor, shard)` copies a checkpoint tensor into it, and `shards`
    are the ids that fill it together."""
    module.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
    if "loaders" not in module.__dict__:
        module.loaders = {}
    module.loaders[name] = (loader, shards)


def rank_slice(tensor: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous slice of `tensor` along `dim` (the whole tensor when dim is None)."""
    if dim is None or size == 1:
        return tensor
    n = tensor.shape[dim] // size
    return tensor.narrow(dim, rank * n, n)


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
    dst.copy_(src)
