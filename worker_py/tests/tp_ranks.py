"""Test helper: run a function on N tensor-parallel ranks (spawned processes joined over gloo, as the worker's
ranks are on the CPU) and collect what each returns."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def run_ranks(fn: Callable[..., Any], tp: int, *args: Any) -> list[Any]:
    """`fn(rank, tp, *args)` on ranks 0 .. tp-1 (a module-level function: spawned processes import it);
    returns their results in rank order. A rank that raises fails the call with its traceback."""
    with tempfile.TemporaryDirectory(prefix="minisgl-tp-") as tmp:
        mp.spawn(_rank_main, args=(fn, tp, tmp, args), nprocs=tp, join=True)
        return [torch.load(Path(tmp) / f"{rank}.pt", weights_only=False) for rank in range(tp)]


def _rank_main(rank: int, fn, tp: int, tmp: str, args: tuple) -> None:
    from minisgl.worker import distributed

    torch.set_num_threads(1)
    distributed.init(rank, tp, f"file://{tmp}/store", torch.device("cpu"))
    try:
        torch.save(fn(rank, tp, *args), Path(tmp) / f"{rank}.pt")
    finally:
        distributed.close()
