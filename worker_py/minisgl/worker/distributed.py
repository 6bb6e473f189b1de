"""The tensor-parallel ranks of one worker: the device each rank uses and the process group they share.

The launcher starts one process per rank with the same flags, plus `--tp-rank` and `--dist-init` (a
`file://` rendezvous in its private run directory: one host, no port to pick). Gloo on the CPU, NCCL on
GPUs, rank r on GPU r of those CUDA_VISIBLE_DEVICES shows.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("minisgl.worker")

# Ranks wait for one another at the first collective, after loading the weights; a rank that dies is
# noticed sooner by the launcher (which stops the engine) than by this timeout.
TIMEOUT = timedelta(minutes=30)


def rank_device(device: str, rank: int, tp_size: int) -> str:
    """The device of rank `rank`: with several ranks, `cuda` becomes `cuda:<rank>` (WorkerConfig refuses a
    numbered GPU with several ranks)."""
    return f"cuda:{rank}" if tp_size > 1 and device == "cuda" else device


def init(rank: int, tp_size: int, init_method: str, device: torch.device) -> None:
    """Joins the process group of the `tp_size` ranks (returns once all have joined)."""
    kwargs = {}
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} needs {device}, but torch sees {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(device)
        # A bound device makes NCCL create its communicator now, outside any CUDA graph capture.
        kwargs["device_id"] = device
    elif "OMP_NUM_THREADS" not in os.environ:
        # Every rank would start one thread per core: the ranks share the cores instead of fighting over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=tp_size, timeout=TIMEOUT, **kwargs
    )
    log.info("rank %d of %d joined its process group (%s on %s)", rank, tp_size, backend, device)


def agree_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (each rank gets it)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
