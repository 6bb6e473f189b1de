"""What every kernel here shares: the Triton import guard and rounding where eager torch rounds.

Each kernel rounds exactly where the eager code rounds (a torch op on bf16 computes in float32 and rounds its
result before the next op reads it), so a model built with the kernels computes the numbers of the one built
without them, up to the last bit of an exp().
"""

from __future__ import annotations

import os

import torch

# Every kernel here was measured and checked against its reference with Triton fusing a * b + c into one
# FMA, its default up to 3.9; Triton 3.10 makes unfused the default. Keep what was checked, unless the
# environment says otherwise.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the torch references run
    triton = None
    tl = None


def available(device: torch.device | str) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def round_to(x, dt: tl.constexpr):
        """x (float32) rounded to the nearest value of `dt` and kept as float32. For bf16 the rounding is
        done on the bits: a cast down and back up may be folded away by the compiler, which would skip the
        rounding the eager code does."""
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dt).to(tl.float32)
