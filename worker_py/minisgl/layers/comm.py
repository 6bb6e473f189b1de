"""The two collectives tensor parallelism needs, over torch.distributed's default group (gloo on the CPU,
NCCL on GPUs; `minisgl.worker.distributed` sets it up). Layers call them only when they are split, so a
single-rank worker never touches torch.distributed.

Both are issued on the current stream and allocate nothing on the host, so a decode forward that calls them
can be captured in a CUDA graph (torch >= 2.1 keeps NCCL work out of its watchdog while a stream captures;
the communicator must exist first, which the eager run before each capture makes sure of).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums `x` over the ranks, in place; every rank gets the same bits."""
    dist.all_reduce(x)
    return x


def all_gather_columns(x: torch.Tensor, ranks: int) -> torch.Tensor:
    """[n, s] on each rank -> [n, ranks * s], rank r's columns at r * s."""
    n, s = x.shape
    out = torch.empty((ranks * n, s), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())
    return out.view(ranks, n, s).permute(1, 0, 2).reshape(n, ranks * s)
