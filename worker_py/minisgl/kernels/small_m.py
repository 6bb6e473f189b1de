"""Linear layers for decode batches of at most 16 rows (Triton, CUDA only).

At batch 1 to 16 a decode step is a matrix-vector product per weight: reading the weights is all the work,
and a weight of a few MB is read in a few microseconds only when every SM has loads in flight from the start.
Every program owns a strip of output columns and a share of the input columns (`split_k`), streams that
block of W once and multiplies it with the whole (zero-padded) 16-row input through `tl.dot`, computing
out^T = W x^T so that the weight strip is the dot's large operand. Programs that split K write float32
partial sums; the last of a strip to finish (counted with an atomic) adds them in a fixed order and finishes
the strip, so the result does not depend on which program ran first and no second kernel is launched.

Around the product, work that would otherwise be a launch of its own:
- `bias`: added in float32 before the one rounding, as cuBLAS's fused bias epilogue does;
- `silu_mul`: W holds [gate; up]; a program reads the same columns of both halves and writes
  silu(gate) * up, rounded where the eager bf16 code rounds (gate and up, then the SiLU, then the product);
- `norm_linear`: the residual add and RMSNorm of `norm.add_rms_norm` folded into the same pass over the
  input: the program multiplies W with `(x + residual) * norm_weight`, sums the squares as it goes, and
  scales its float32 result by each row's 1/rms at the end. The weight loads never wait for the norm; the
  price is one rounding fewer than the eager norm makes (it rounds the normalised row before the weight
  multiplies it), differences of the order of bf16's last bit.

Where it runs is measured, not assumed: `TILES` lists the (shape, norm) pairs where it beat the path without
it (`scripts/bench_kernels.py`, weights streamed from HBM as in a decode step), and `suits` sends every other
product to cuBLAS.
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
    split_k: int = 1


# (output columns, input columns, silu_mul, norm in the prologue) -> tile, from scripts/bench_kernels.py.
TILES: dict[tuple[int, int, bool, bool], Tile] = {
    (896, 896, False, False): Tile(16, 256, 2, 4),
    (151936, 896, False, False): Tile(64, 128, 4, 3),
}
DEFAULT_TILE = Tile(16, 256, 2, 4)  # for explicit calls on other shapes


def suits(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False, norm: bool = False) -> bool:
    """Whether a product should go through this module: a few rows, a half-precision dtype (tl.dot would
    run float32 through TF32), and a (weight shape, norm) pair in `TILES`."""
    n, k = weight.shape
    key = (n // 2 if silu_mul else n, k, silu_mul, norm)
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
    return _launch(x, None, None, 0.0, weight, bias, silu_mul, tile, norm=False)[0]


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
    None, the sum rounded as `norm.add_rms_norm` rounds it), in one launch."""
    return _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, tile, norm=True)


# Per device: one arrival counter per column strip, zero between launches (the last program of a strip
# resets its own); kernels on one stream run one after another, so every launch can share them.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_STRIPS = 1 << 16


def _counters(device: torch.device, strips: int) -> torch.Tensor:
    if strips > MAX_STRIPS:
        raise ValueError(f"split-K over {strips} column strips (at most {MAX_STRIPS})")
    counters = _COUNTERS.get(device)
    if counters is None:
        counters = _COUNTERS[device] = torch.zeros(MAX_STRIPS, dtype=torch.int32, device=device)
    return counters


def _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, tile, norm):
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"small_m takes at most {MAX_ROWS} rows, got {m}")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    if silu_mul and bias is not None:
        raise ValueError("silu_mul takes no bias")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if norm and residual is not None else x
    if m == 0:
        return out, new_residual
    t = tile or TILES.get((n, k, silu_mul, norm), DEFAULT_TILE)
    k_tiles = triton.cdiv(k, t.block_k)
    per_split = triton.cdiv(k_tiles, t.split_k)
    splits = triton.cdiv(k_tiles, per_split)  # no split left without columns
    strips = triton.cdiv(n, t.block_n)
    slot = t.block_n * 16 * (2 if silu_mul else 1) + 16
    partials = torch.empty(strips * splits * slot if splits > 1 else 1, dtype=torch.float32, device=x.device)
    counters = _counters(x.device, strips) if splits > 1 else partials
    _small_m_kernel[(strips, splits)](
        x,
        residual if residual is not None else x,
        new_residual,
        norm_weight if norm else x,
        eps,
        weight,
        bias if bias is not None else weight,
        out,
        partials,
        counters,
        m,
        n,
        k,
        x.stride(0),
        per_split * t.block_k,
        NORM=norm,
        HAS_RES=residual is not None,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        SPLIT_K=splits,
        SLOT=slot,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
    )
    return out, new_residual


if triton is not None:
    from minisgl.kernels.rounding import round_to  # rounds where eager bf16 torch rounds

    @triton.jit(do_not_specialize=["eps"])
    def _small_m_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        nw_ptr,
        eps,
        w_ptr,
        b_ptr,
        out_ptr,
        part_ptr,
        count_ptr,
        M,
        N,
        K,
        stride_x,
        k_per_split,
        NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        SPLIT_K: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, 16)
        col_ok = cols < N
        row_ok = rows < M
        dt = out_ptr.dtype.element_ty
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        sq = tl.zeros([16], dtype=tl.float32)
        k_lo = split * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_hi
            w_mask = col_ok[:, None] & k_ok[None, :]
            # The weights are read once per step: keep them out of the L2 the activations live in.
            w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            if SILU_MUL:
                up_rows = w_rows + N * K
                wu = tl.load(up_rows + ks[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            x_mask = row_ok[None, :] & k_ok[:, None]
            x_offs = rows[None, :] * stride_x + ks[:, None]
            xt = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
            if NORM:
                xf = xt.to(tl.float32)
                if HAS_RES:
                    xf = round_to(xf + tl.load(res_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32), dt)
                    if pid == 0:
                        tl.store(res_out_ptr + rows[None, :] * K + ks[:, None], xf.to(dt), mask=x_mask)
                sq += tl.sum(xf * xf, axis=0)
                nw = tl.load(nw_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
                xt = (xf * nw[:, None]).to(dt)
            acc += tl.dot(w, xt)
            if SILU_MUL:
                acc_up += tl.dot(wu, xt)
        if SPLIT_K > 1:
            # Publish this split's sums; the strip's last arrival adds all of them in split order.
            tile = tl.arange(0, BLOCK_N)[:, None] * 16 + rows[None, :]
            mine = part_ptr + (pid * SPLIT_K + split) * SLOT
            tl.store(mine + tile, acc)
            if SILU_MUL:
                tl.store(mine + BLOCK_N * 16 + tile, acc_up)
            if NORM:
                tl.store(mine + SLOT - 16 + rows, sq)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
            acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
            sq = tl.zeros([16], dtype=tl.float32)
            # Masks built as tensors: a scalar mask is not accepted everywhere (Triton's interpreter).
            tile_last = tl.zeros_like(tile) + arrived == SPLIT_K - 1
            rows_last = tl.zeros_like(rows) + arrived == SPLIT_K - 1
            for s in range(SPLIT_K):
                theirs = part_ptr + (pid * SPLIT_K + s) * SLOT
                acc += tl.load(theirs + tile, mask=tile_last, other=0.0, cache_modifier=".cg")
                if SILU_MUL:
                    up = theirs + BLOCK_N * 16 + tile
                    acc_up += tl.load(up, mask=tile_last, other=0.0, cache_modifier=".cg")
                if NORM:
                    sq += tl.load(theirs + SLOT - 16 + rows, mask=rows_last, other=0.0, cache_modifier=".cg")
            if arrived == SPLIT_K - 1:
                tl.atomic_xchg(count_ptr + pid, 0)
        if NORM:
            rstd = tl.rsqrt(sq / K + eps)[None, :]
            acc = acc * rstd
            acc_up = acc_up * rstd
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            gate = round_to(acc, dt)
            acc = round_to(gate / (1.0 + tl.exp(-gate)), dt) * round_to(acc_up, dt)
        out_mask = row_ok[None, :] & col_ok[:, None]
        if SPLIT_K > 1:
            out_mask = out_mask & tile_last
        tl.store(out_ptr + rows[None, :] * N + cols[:, None], acc.to(dt), mask=out_mask)
