"""SiLU-and-mul over a merged [gate; up] projection: one launch where eager torch needs two and a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl.kernels import pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

    from minisgl.kernels.pdl import wait_previous
    from minisgl.kernels.rounding import round_to

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_previous(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        s = round_to(g / (1.0 + tl.exp(-g)), dt)
        tl.store(out_ptr + row * n_cols + cols, (s * u).to(dt), mask=mask)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [t, 2I] contiguous -> silu(gate) * up [t, I]."""
    t, two_i = gate_up.shape
    out = torch.empty(t, two_i // 2, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_and_mul_kernel[(t, triton.cdiv(two_i // 2, block))](
            gate_up, out, two_i // 2, BLOCK=block, **pdl.launch_args(gate_up)
        )
    return out
