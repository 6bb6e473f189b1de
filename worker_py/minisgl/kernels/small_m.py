"""Linear layers for decode batches of at most 16 rows (Triton, CUDA only).

At batch 1 to 16 a decode step is a matrix-vector product per weight: reading the weights is all the work.
Every program owns a strip of output columns, streams its rows of W once and multiplies them with the whole
(zero-padded) 16-row input through `tl.dot`, computing out^T = W x^T so that the weight strip is the dot's
large operand. Around the product, work that would otherwise be a launch of its own:
- `bias`: added in float32 before the one rounding, as cuBLAS's fused bias epilogue does;
- `silu_mul`: W holds [gate; up]; a program reads the same columns of both halves and writes
  silu(gate) * up, rounded where the eager bf16 code rounds (gate and up, then the SiLU, then the product);
- `norm_linear`: the residual add and RMSNorm of `norm.add_rms_norm` as a prologue, rounded as it rounds.

Where it runs is measured, not assumed: `TILES` lists the weight shapes where it beat the path without it on
the H200 (`scripts/bench_kernels.py`, weights streamed from HBM as in a decode step), and `suits` sends every
other shape to cuBLAS. On Qwen2.5-0.5B that is the o projection (3.6 vs 4.7 us at one row) and the lm_head
(67.4 vs 71.9 us); with the norm in its prologue the qkv and gate/up kernels lost (7.2 vs 5.4 us and 13.6
vs 10.4 us, the norm's pass over the input delaying the first weight loads), and the down projection tied:
its K of 4864 over 56 column strips is a long serial reduction where cuBLAS splits K.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest tile: the input is padded to it


class Tile(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (output columns, input columns, silu_mul) -> tile, from scripts/bench_kernels.py on the H200, 2026-11-29.
TILES: dict[tuple[int, int, bool], Tile] = {
    (896, 896, False): Tile(16, 256, 2, 4),
    (151936, 896, False): Tile(64, 128, 4, 3),
}
DEFAULT_TILE = Tile(16, 256, 2, 4)  # for explicit calls on other shapes


def suits(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False) -> bool:
    """Whether a product should go through this module: a few rows, a half-precision dtype (tl.dot would
    run float32 through TF32), and a weight shape in `TILES`."""
    n, k = weight.shape
    key = (n // 2 if silu_mul else n, k, silu_mul)
    return x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and key in TILES


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    tile: Tile | None = None,
) -> torch.Tensor:
    """x [m <= 16, K] @ weight[N', K]^T (+ bias) -> [m, N'], or with `silu_mul` (weight [2N, K], no bias)
    silu(x W_gate^T) * (x W_up^T) -> [m, N]. Weight and x contiguous in their last dimension."""
    return _launch(x, None, None, 0.0, weight, bias, silu_mul, tile)[0]


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    tile: Tile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear(RMSNorm(x + residual), ...)` and the new residual `x + residual` (x itself when residual is
    None), rounded as `norm.add_rms_norm` rounds: the norm runs in the matrix kernel's prologue, so the
    normalised rows never go through memory and the norm costs no launch of its own."""
    out, new_residual = _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, tile)
    return out, new_residual


def _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, tile):
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"small_m takes at most {MAX_ROWS} rows, got {m}")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if silu_mul and bias is not None:
        raise ValueError("silu_mul takes no bias")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    new_residual = torch.empty_like(x) if norm and residual is not None else x
    if m == 0:
        return out, new_residual
    t = tile or TILES.get((n, k, silu_mul), DEFAULT_TILE)
    grid = (triton.cdiv(n, t.block_n),)
    _small_m_kernel[grid](
        x,
        residual if residual is not None else x,
        new_residual,
        norm_weight if norm else x,
        eps,
        weight,
        bias if bias is not None else weight,
        out,
        m,
        n,
        k,
        x.stride(0),
        NORM=norm,
        HAS_RES=residual is not None,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out, new_residual


if triton is not None:
    from minisgl.kernels.rounding import round_to  # rounds where eager bf16 torch rounds

    @triton.jit
    def _input_tile(
        x_ptr, res_ptr, nw_ptr, rstd, offs, mask, ks, k_ok, NORM: tl.constexpr, HAS_RES: tl.constexpr
    ):
        """The input at `offs` ([BLOCK_K, 16]: the rows transposed); with NORM, x + residual rounded, and
        normalised when `rstd` ([16]) is given (the prologue's first pass has none yet)."""
        xt = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if NORM:
            dt = xt.dtype
            xt = xt.to(tl.float32)
            if HAS_RES:
                xt = round_to(xt + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32), dt)
            if rstd is not None:
                w = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                xt = (round_to(xt * rstd[None, :], dt) * w[:, None]).to(dt)
        return xt

    @triton.jit
    def _small_m_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        nw_ptr,
        eps,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_x,
        NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, 16)
        col_ok = cols < N
        row_ok = rows < M
        rstd = None
        if NORM:
            # First pass: each row's mean square (every program computes it; the rows are a few KB in L2),
            # and program 0 writes the new residual.
            sq = tl.zeros([16], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                mask = row_ok[None, :] & (ks < K)[:, None]
                s = _input_tile(
                    x_ptr,
                    res_ptr,
                    nw_ptr,
                    None,
                    rows[None, :] * stride_x + ks[:, None],
                    mask,
                    ks,
                    ks < K,
                    NORM,
                    HAS_RES,
                )
                if HAS_RES:  # noqa: SIM102 (a compile-time branch around a run-time one)
                    if pid == 0:
                        dst = res_out_ptr + rows[None, :] * K + ks[:, None]
                        tl.store(dst, s.to(res_out_ptr.dtype.element_ty), mask=mask)
                s = s.to(tl.float32)
                sq += tl.sum(s * s, axis=0)
            rstd = tl.rsqrt(sq / K + eps)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xt = _input_tile(
                x_ptr,
                res_ptr,
                nw_ptr,
                rstd,
                rows[None, :] * stride_x + ks[:, None],
                row_ok[None, :] & k_ok[:, None],
                ks,
                k_ok,
                NORM,
                HAS_RES,
            )
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(w, xt)
            if SILU_MUL:
                wu = tl.load(w_rows + N * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc_up += tl.dot(wu, xt)
        dt = out_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            gate = round_to(acc, dt)
            acc = round_to(gate / (1.0 + tl.exp(-gate)), dt) * round_to(acc_up, dt)
        dst = out_ptr + rows[None, :] * N + cols[:, None]
        tl.store(dst, acc.to(dt), mask=row_ok[None, :] & col_ok[:, None])
