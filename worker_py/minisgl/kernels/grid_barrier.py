"""A barrier across every program of a launch, for kernels that run several dependent phases in one launch
(`kernels/mlp.py`).

Between two kernels on a stream the GPU itself waits for the first to finish; a phase that needs all of the
previous phase's results inside one launch must wait for it in the kernel: every program counts its arrival
with an atomic, the last to arrive resets the count and moves a generation number on, the others spin until
they see it move. The count is back at zero after every barrier, so the same two words serve every launch
and every replay of a CUDA graph.

This waits forever unless every program of the grid runs at the same time: launch at most as many programs
as the GPU holds at once (one per SM is always safe), and never under Triton's interpreter, which runs the
programs one after another (kernels that use it run their phases as separate launches there). A kernel
launched with PDL calls `pdl.wait_previous` before its first barrier: the next kernel is only scheduled once
every program has passed that call, so it cannot take the SM slots a program of this grid is still waiting
for.
"""

from __future__ import annotations

import torch

from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

WORDS = 2  # arrivals, generation

_STATE: dict[torch.device, torch.Tensor] = {}


def state(device: torch.device) -> torch.Tensor:
    """The barrier's two words on `device`, shared by every launch on it: kernels on one stream run one at a
    time and leave the count at zero."""
    words = _STATE.get(device)
    if words is None:
        words = _STATE[device] = torch.zeros(WORDS, dtype=torch.int32, device=device)
    return words


def max_programs(device: torch.device) -> int:
    """The programs a barrier kernel may launch on `device`: one per SM."""
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    @triton.jit
    def grid_barrier(state_ptr, programs):
        """Returns once all `programs` programs of the grid have called it; what each wrote before is then
        visible to all (release by every arrival, acquire by every waiter)."""
        tl.debug_barrier()  # the whole program's writes are done before its one thread arrives
        generation = tl.atomic_add(state_ptr + 1, 0, sem="relaxed", scope="gpu")
        arrived = tl.atomic_add(state_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == programs - 1:
            tl.atomic_xchg(state_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_add(state_ptr + 1, 1, sem="release", scope="gpu")
        else:
            while tl.atomic_add(state_ptr + 1, 0, sem="acquire", scope="gpu") == generation:
                pass
        tl.debug_barrier()
