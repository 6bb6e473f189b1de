"""Test helper: run a function on N tensor-parallel ranks (spawned processes joined as the worker's ranks
are: gloo on the CPU, NCCL with rank r on GPU r) and collect what each returns."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., Any], tp: int, *args: Any, device: str = "cpu") -> list[Any]:
    """`fn(rank, tp, *args)` on ranks 0 .. tp-1 (a module-level function: spawned processes import it);
    returns their results (moved to the CPU) in rank order. A rank that raises fails the call with its
    traceback."""
    with tempfile.TemporaryDirectory(prefix="minisgl-tp-") as tmp:
        mp.spawn(_rank_main, args=(fn, tp, tmp, args, device), nprocs=tp, join=True)
        return [torch.load(Path(tmp) / f"{rank}.pt", weights_only=False) for rank in range(tp)]


def _rank_main(rank: int, fn, tp: int, tmp: str, args: tuple, device: str) -> None:
    from minisgl.worker import distributed

    torch.set_num_threads(1)
    dev = torch.device(distributed.rank_device(device, rank, tp))
    distributed.init(rank, tp, f"file://{tmp}/store", dev)
    try:
        torch.save(_to_cpu(fn(rank, tp, *args)), Path(tmp) / f"{rank}.pt")
    finally:
        distributed.close()


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x
