"""RMSNorm, alone or after the residual add: `rms_norm_reference` is Hugging Face's numerics (normalise in
float32, round to the input's dtype, then scale), the kernel does the same in one launch where eager torch
needs eight or nine, and also returns the new residual."""

from __future__ import annotations

import torch

from minisgl.kernels import pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

    from minisgl.kernels.pdl import wait_previous
    from minisgl.kernels.rounding import round_to

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        w_ptr,
        out_ptr,
        eps,
        n_cols,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
        wait_previous(PDL)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = round_to(x + r, out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * n_cols + cols, x.to(out_ptr.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = round_to(x * rstd, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Multiplying by the weight in float32 would change bf16 results, and greedy tokens with them.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual
    return rms_norm_reference(x, weight, eps), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [t, H] contiguous -> RMSNorm(x) [t, H]."""
    out = torch.empty_like(x)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x,
            x,
            x,
            weight,
            out,
            eps,
            x.shape[1],
            HAS_RES=False,
            BLOCK=block,
            **pdl.launch_args(x),
        )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x); the sum rounded to x's dtype as the eager add rounds it."""
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x,
            residual,
            new_residual,
            weight,
            out,
            eps,
            x.shape[1],
            HAS_RES=True,
            BLOCK=block,
            **pdl.launch_args(x),
        )
    return out, new_residual
