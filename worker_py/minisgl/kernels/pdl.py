"""Programmatic dependent launch (Hopper and later): a kernel launched with it is scheduled while the kernel
before it on the stream still runs, and waits for that kernel to finish, its writes visible, before touching
memory (`griddepcontrol.wait`). A decode step at a few rows is some 250 kernels of a few microseconds each;
without it every one of them also waits for its own launch after the one before ends.

A kernel that takes part has a `PDL` constexpr and calls `wait_previous(PDL)` before it reads or writes
anything another kernel writes; what none writes (weights, tables, the step's upload, copied before the
graph) it may read before, where the wait hides those loads. Every program calls it, even one with nothing
to do: a kernel's wait covers only the kernel before it, so one that ended early would let the next run
ahead of the kernels before. Its launches add `launch_args(tensor)`. Only once past the wait does it let
the next kernel be scheduled: at most two kernels are in flight, the later one waiting. A kernel without the
attribute (cuBLAS, torch's) is launched as always, after the one before it ends.

Only the CUDA graphs of small steps are captured with it (`launched_early`, `MAX_ROWS`): measured on an H100
(docs/benchmarks.md, 2026-12-07), a decode step's GPU time falls 11-12% at batch 1 and 16, is the same at 64
and grows 2% at 256, where the kernel waiting early holds SM slots the one before could use. Eager steps
launch as always.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MAX_ROWS = 32  # the largest captured graph launched with it


class LaunchSwitch:
    """A way of launching that our kernels read at every launch, on only inside `scope(True)` (a graph being
    captured with it): eager steps never use it."""

    def __init__(self) -> None:
        self.on = False

    @contextlib.contextmanager
    def scope(self, on: bool) -> Iterator[None]:
        before, self.on = self.on, on
        try:
            yield
        finally:
            self.on = before


switch = LaunchSwitch()
# Our kernels launched inside the block are launched with PDL if `on`.
launched_early = switch.scope


def launch_args(t: torch.Tensor) -> dict:
    """The extra arguments of a launch on t's device: the `PDL` constexpr, and Triton's launch option."""
    if switch.on and t.is_cuda and _hopper(t.device.index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@functools.cache
def _hopper(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


if triton is not None:

    @triton.jit
    def wait_previous(PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
