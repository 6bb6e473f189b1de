"""Weights pulled into L2 ahead of the kernels that read them (Hopper's bulk prefetch), from inside the norm
kernels that precede them.

At 1 to 32 rows a decode layer's kernels are bound by their latency, not by HBM: the MLP half reads 26 MB of
weights in ~17.5 us on an H100, where the bandwidth alone would take 7.8 (docs/benchmarks.md, 2026-12-07),
and a projection whose weights sit in L2 runs in about half the time. So each RMSNorm kernel, before it
waits for the kernel before it, asks the memory system to bring the weights of the next projections into L2
(`cp.async.bulk.prefetch.L2`: one instruction a chunk, nothing comes back to the SM, nothing waits), and HBM
streams them while the attention or the previous projections run. The model says which weights each norm
prefetches (`CausalLM.plan_prefetch`).

Only the CUDA graphs of small steps are captured with it (`into_l2`, `MAX_ROWS`, like PDL): at large batches
the projections are compute-bound and read each weight once anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minisgl.kernels.pdl import LaunchSwitch, _hopper
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 32  # the largest captured graph whose norms prefetch
REGIONS = 2  # weight tensors a norm kernel may prefetch

switch = LaunchSwitch()
# Norm kernels launched inside the block prefetch their weights if `on`.
into_l2 = switch.scope


def launch_args(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> dict:
    """The prefetch arguments of a norm kernel's launch on x's device: up to REGIONS weight tensors (their
    address and size in bytes), and the `PREFETCH` constexpr."""
    if not (switch.on and weights and x.is_cuda and _hopper(x.device.index)):
        return {"pf_a_ptr": x, "pf_a_bytes": 0, "pf_b_ptr": x, "pf_b_bytes": 0, "PREFETCH": False}
    if len(weights) > REGIONS:
        raise ValueError(f"a norm prefetches at most {REGIONS} tensors, got {len(weights)}")
    regions = [(w, w.numel() * w.element_size()) for w in weights]
    for w, size in regions:
        if not w.is_contiguous() or w.data_ptr() % 16 or size % 16:
            raise ValueError("a bulk prefetch needs a contiguous tensor of 16-byte aligned address and size")
    (a, a_bytes), (b, b_bytes) = (regions + [(x, 0)])[:REGIONS]
    return {"pf_a_ptr": a, "pf_a_bytes": a_bytes, "pf_b_ptr": b, "pf_b_bytes": b_bytes, "PREFETCH": True}


if triton is not None:

    @triton.jit
    def _prefetch_region(ptr, nbytes, LANES: tl.constexpr, CHUNK: tl.constexpr):
        """One chunk of the region per thread at a time: LANES bulk prefetches of CHUNK bytes (the last
        shorter; sizes stay multiples of 16), none when nbytes is 0."""
        base = ptr.to(tl.pointer_type(tl.int8))
        for start in range(0, nbytes, LANES * CHUNK):
            offs = start + tl.arange(0, LANES).to(tl.int64) * CHUNK
            size = tl.minimum(tl.maximum(nbytes - offs, 0), CHUNK).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }",
                "=r,l,r",
                [base + offs, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )

    @triton.jit
    def prefetch_weights(pf_a_ptr, pf_a_bytes, pf_b_ptr, pf_b_bytes, PREFETCH: tl.constexpr):
        """Called first in a kernel (before its wait: weights are written by no kernel): program 0's threads
        ask for both regions, 64 KiB a prefetch."""
        if PREFETCH:  # noqa: SIM102 (a constexpr alone: without it nothing is compiled in)
            if tl.program_id(0) == 0:
                _prefetch_region(pf_a_ptr, pf_a_bytes, 128, 65536)
                _prefetch_region(pf_b_ptr, pf_b_bytes, 128, 65536)
