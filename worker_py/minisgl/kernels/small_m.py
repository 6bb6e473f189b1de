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
- `qkv_rope`: the merged q/k/v projection of an attention layer, each program one head: it streams the
  head's two halves of W, so the rotary embedding pairs them in registers, and writes q to the attention's
  input, k and v straight into the paged KV cache (what `rope.rope_store_kv` does).

Where it runs is measured, not assumed: `TILES` lists the (shape, op) pairs where it beat the path without
it (`scripts/bench_kernels.py`, weights streamed from HBM as in a decode step), and `suits` sends every other
product to cuBLAS. On Qwen2.5-0.5B (an H100, 2026-12-07) that is every projection but q/k/v without RoPE.
Three more fusions measured slower in the model than the launches they save, and were removed
(docs/benchmarks.md): the RMSNorm inside the next projection's pass over its input (its float32 pass costs
registers in the weight loop), the residual add and norm finished by the last strip of o and down (one
program normalising every row, serially), and tiles that read their weights before waiting for the kernel
before (with PDL: they hold SM slots the running kernel could use).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minisgl.kernels import pdl
from minisgl.kernels.pdl import LaunchSwitch
from minisgl.kernels.rope import RopeStore
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest tile: the input is padded to it

# An experiment, off unless a graph is captured inside `prefetched(True)` (`--prefetch-weights`): each program
# first asks for its own tile of the weights into L2, one `prefetch.global.L2` a 128-byte line, before it
# waits for the kernel before it. Launched early, it then streams its weights while that kernel runs, holding
# no registers (the tiles that loaded theirs before the wait held them, and lost: docs/benchmarks.md,
# 2026-12-07), and spread over every program (one program prefetching a norm's next weights stalled the
# step four times over, 2026-12-08).
prefetch_switch = LaunchSwitch()
prefetched = prefetch_switch.scope
# Larger weights are not prefetched: an LM head (272 MB for Qwen) would only evict what the others brought.
PREFETCH_MAX_BYTES = 32 << 20


class Tile(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


# What a launch computes around the product (the entry points below): the third part of a `TILES` key.
LINEAR, SILU, ROPE = "linear", "silu", "rope"

# (weight rows, input columns, op) -> tile, from scripts/bench_kernels.py and bench_gpu.py on an H100.
TILES: dict[tuple[int, int, str], Tile] = {
    (1152, 896, ROPE): Tile(32, 256, 4, 3, split_k=4),  # with RoPE: 5.8 against 6.7 us (H100, 2026-12-07)
    (9728, 896, SILU): Tile(32, 128, 4, 3),  # with PDL: 0.884 against 0.906 ms a step at batch 1 (H100)
    (896, 896, LINEAR): Tile(16, 256, 4, 3),
    (896, 4864, LINEAR): Tile(64, 256, 4, 3, split_k=8),
    (151936, 896, LINEAR): Tile(128, 128, 8, 3),
}
DEFAULT_TILE = Tile(16, 256, 2, 4)  # for explicit calls on other shapes


def suits(x: torch.Tensor, weight: torch.Tensor, op: str = LINEAR) -> bool:
    """Whether a product should go through this module: a few rows, a half-precision dtype (tl.dot would
    run float32 through TF32), and a (weight shape, op) in `TILES`."""
    return (
        x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and (*weight.shape, op) in TILES
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
    tile: Tile | None = None,
) -> torch.Tensor:
    """x [m <= 16, K] @ weight[N', K]^T (+ bias) -> [m, N'], or with `silu_mul` (weight [2N, K], no bias)
    silu(x W_gate^T) * (x W_up^T) -> [m, N]. Weight and x contiguous in their last dimension."""
    return _launch(x, weight, bias, SILU if silu_mul else LINEAR, tile)


def qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rope: RopeStore,
    tile: Tile | None = None,
) -> torch.Tensor:
    """`rope.rope_store_kv(linear(x, weight, bias), ...)` in one launch: returns q [m, Hq, D] and writes this
    step's k and v at `rope.out_loc`."""
    heads = rope.num_heads + 2 * rope.num_kv_heads
    if weight.shape[0] != heads * rope.head_dim:
        raise ValueError(f"a q/k/v weight of {weight.shape[0]} rows for {heads} heads of {rope.head_dim}")
    q = _launch(x, weight, bias, ROPE, tile, rope=rope)
    return q.view(-1, rope.num_heads, rope.head_dim)


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


def _launch(x, weight, bias, op, tile, rope: RopeStore | None = None) -> torch.Tensor:
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"small_m takes at most {MAX_ROWS} rows, got {m}")
    silu_mul = op == SILU
    if silu_mul and bias is not None:
        raise ValueError("silu_mul takes no bias")
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    out = torch.empty(m, rope.num_heads * rope.head_dim if rope else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    t = tile or TILES.get((weight.shape[0], k, op), DEFAULT_TILE)
    if rope is not None:  # a strip is one head: its two halves side by side, as gate and up are
        t = t._replace(block_n=rope.head_dim // 2)
    k_tiles = triton.cdiv(k, t.block_k)
    per_split = triton.cdiv(k_tiles, t.split_k)
    splits = triton.cdiv(k_tiles, per_split)  # no split left without columns
    paired = silu_mul or rope is not None
    strips = n // rope.head_dim if rope else triton.cdiv(n, t.block_n)
    slot = t.block_n * 16 * (2 if paired else 1)
    r = rope or RopeStore(x, x, x, x, x, x, 0, 0, 0)
    partials = counters = weight  # placeholders: a single split reads neither
    if splits > 1:
        partials = torch.empty(strips * splits * slot, dtype=torch.float32, device=x.device)
        counters = _counters(x.device, strips)
    _small_m_kernel[(strips, splits)](
        x,
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
        r.positions,
        r.cos,
        r.sin,
        r.out_loc,
        r.k_cache,
        r.v_cache,
        HAS_BIAS=bias is not None,
        PREFETCH=prefetch_switch.on and x.is_cuda and weight.nbytes <= PREFETCH_MAX_BYTES,
        LINE=128 // weight.element_size(),
        SILU_MUL=silu_mul,
        ROPE=rope is not None,
        NQ=r.num_heads,
        NKV=r.num_kv_heads,
        SPLIT_K=splits,
        SLOT=slot,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        num_warps=t.num_warps,
        num_stages=t.num_stages,
        **pdl.launch_args(x),
    )
    return out


if triton is not None:
    from minisgl.kernels.pdl import wait_previous
    from minisgl.kernels.rounding import round_to  # rounds where eager bf16 torch rounds

    # Positions and KV locations are slices of the step's packed buffer at any offset (see rope.py).
    @triton.jit(do_not_specialize=["pos_ptr", "loc_ptr"])
    def _small_m_kernel(
        x_ptr,
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
        pos_ptr,
        cos_ptr,
        sin_ptr,
        loc_ptr,
        k_cache_ptr,
        v_cache_ptr,
        HAS_BIAS: tl.constexpr,
        PREFETCH: tl.constexpr,
        LINE: tl.constexpr,
        SILU_MUL: tl.constexpr,
        ROPE: tl.constexpr,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        SPLIT_K: tl.constexpr,
        SLOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, 16)
        row_ok = rows < M
        dt = out_ptr.dtype.element_ty
        # The strip's columns, and the paired ones of its second tile: up beside gate, or the second half
        # of the head beside its first.
        PAIRED: tl.constexpr = SILU_MUL or ROPE
        if ROPE:
            cols = pid * 2 * BLOCK_N + tl.arange(0, BLOCK_N)
            pair_cols = cols + BLOCK_N
        else:
            cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            pair_cols = cols + N
        col_ok = cols < N
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K
        pair_rows = w_ptr + pair_cols.to(tl.int64)[:, None] * K
        k_lo = split * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        # What no kernel writes (the bias; the step's positions and KV locations, which the upload wrote) is
        # read before the wait, so the epilogue does not wait for those loads.
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            if ROPE:
                bias2 = tl.load(b_ptr + pair_cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        if ROPE:
            pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)[None, :]
            loc = tl.load(loc_ptr + rows, mask=row_ok, other=0).to(tl.int64)[None, :]
        if PREFETCH:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                lines = k0 + tl.arange(0, BLOCK_K // LINE) * LINE
                ask = col_ok[:, None] & (lines < k_hi)[None, :]
                _prefetch_lines(w_rows + lines[None, :], ask)
                if PAIRED:
                    _prefetch_lines(pair_rows + lines[None, :], ask)
        wait_previous(PDL)
        acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_hi
            w_mask = col_ok[:, None] & k_ok[None, :]
            # The weights are read once per step: keep them out of the L2 the activations live in.
            w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            if PAIRED:
                w2 = tl.load(pair_rows + ks[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            x_mask = row_ok[None, :] & k_ok[:, None]
            xt = tl.load(x_ptr + rows[None, :] * stride_x + ks[:, None], mask=x_mask, other=0.0)
            acc += tl.dot(w, xt)
            if PAIRED:
                acc2 += tl.dot(w2, xt)
        if SPLIT_K > 1:
            # Publish this split's sums; the strip's last arrival adds all of them in split order.
            tile = tl.arange(0, BLOCK_N)[:, None] * 16 + rows[None, :]
            mine = part_ptr + (pid * SPLIT_K + split) * SLOT
            tl.store(mine + tile, acc)
            if PAIRED:
                tl.store(mine + BLOCK_N * 16 + tile, acc2)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
            # A mask built as a tensor: a scalar mask is not accepted everywhere (Triton's interpreter).
            tile_last = tl.zeros_like(tile) + arrived == SPLIT_K - 1
            acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
            for s in range(SPLIT_K):
                theirs = part_ptr + (pid * SPLIT_K + s) * SLOT
                acc += tl.load(theirs + tile, mask=tile_last, other=0.0, cache_modifier=".cg")
                if PAIRED:
                    acc2 += tl.load(
                        theirs + BLOCK_N * 16 + tile, mask=tile_last, other=0.0, cache_modifier=".cg"
                    )
            if arrived == SPLIT_K - 1:
                tl.atomic_xchg(count_ptr + pid, 0)
        out_mask = row_ok[None, :] & col_ok[:, None]
        if SPLIT_K > 1:
            out_mask = out_mask & tile_last
        if HAS_BIAS:
            acc += bias
            if ROPE:
                acc2 += bias2
        if SILU_MUL:
            gate = round_to(acc, dt)
            acc = round_to(gate / (1.0 + tl.exp(-gate)), dt) * round_to(acc2, dt)
        if ROPE:
            _rope_epilogue(
                round_to(acc, dt),
                round_to(acc2, dt),
                pid,
                rows,
                out_mask,
                pos,
                cos_ptr,
                sin_ptr,
                loc,
                out_ptr,
                k_cache_ptr,
                v_cache_ptr,
                NQ,
                NKV,
                BLOCK_N,
            )
        else:
            tl.store(out_ptr + rows[None, :] * N + cols[:, None], acc.to(dt), mask=out_mask)

    @triton.jit
    def _prefetch_lines(ptrs, ask):
        """One L2 prefetch for each of `ptrs` where `ask` holds; nothing comes back, nothing waits."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r",
            [ptrs, ask.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _rope_epilogue(
        x1,
        x2,
        head,
        rows,
        mask,
        pos,
        cos_ptr,
        sin_ptr,
        loc,
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        HALF: tl.constexpr,
    ):
        """Head `head` of q/k/v for each row (x1, x2: its two halves, [HALF, 16], rounded as the projection's
        output; pos, loc: the rows' positions and KV locations, [1, 16] int64): q and k rotated as
        `rope.rope_store_kv` rotates them; q to the attention's input, k and v to the cache at `loc`."""
        D: tl.constexpr = 2 * HALF
        dt = q_ptr.dtype.element_ty
        d = tl.arange(0, HALF)[:, None]
        if head < NQ + NKV:
            cos1 = tl.load(cos_ptr + pos * D + d, mask=mask, other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + pos * D + HALF + d, mask=mask, other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + pos * D + d, mask=mask, other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + pos * D + HALF + d, mask=mask, other=0.0).to(tl.float32)
            o1 = round_to(x1 * cos1, dt) + round_to(-x2 * sin1, dt)
            o2 = round_to(x2 * cos2, dt) + round_to(x1 * sin2, dt)
        else:
            o1, o2 = x1, x2
        if head < NQ:
            dst = q_ptr + rows[None, :] * NQ * D + head * D + d
        else:
            if head < NQ + NKV:
                dst = k_cache_ptr + loc * NKV * D + (head - NQ) * D + d
            else:
                dst = v_cache_ptr + loc * NKV * D + (head - NQ - NKV) * D + d
        tl.store(dst, o1.to(dt), mask=mask)
        tl.store(dst + HALF, o2.to(dt), mask=mask)
