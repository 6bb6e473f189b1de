"""Paged decode attention in Triton (CUDA only), with no host-side plan: safe to capture in a CUDA graph.

FlashInfer's decode plans its KV split on the host every step; inside a graph it must plan for the worst
case, so it always splits and always merges. Here the launch grid depends only on the batch rows and a fixed
`num_splits`, and every program reads its request's length on the device and works out its own share of the
tokens, so one captured launch serves every later step whatever the lengths are. Splits that find no tokens
(short requests) write one -inf and leave; the combine skips them.

Two kernels by default ("flash decoding"):
1. `_split_kernel`, grid (rows, Hkv, num_splits). A program takes every query head of one KV head (the group
   is padded to 16 rows, the smallest tile `tl.dot` takes, so K and V are read once per group rather than
   once per query head) and one contiguous share of the request's tokens, rounded up to whole blocks of
   `block_n` tokens. It walks its share block by block, finds each token's page through the request's page
   table, and keeps a float32 online softmax. It writes its normalised output and log-sum-exp to `partial`.
2. `_combine_kernel`, grid (rows, Hq): weighs the splits of one query head by their log-sum-exp.
A row short enough for the first split's share (at least `min_split_tokens`) is that split's alone: it writes
the output as a single split would, and the combine leaves the row be, so a large batch of short requests
pays neither the partials' round trip nor the combine's reading of them.

With `fused_combine=True` there is one launch: each split program bumps a counter of its (row, KV head) after
writing its partial result, and the program that sees the last count combines the whole group and resets the
counter to zero, so a replayed graph finds it zeroed again.

Trade-off of `num_splits` (see `splits_for`): more splits give more programs, which a small batch or a long
context needs to fill the GPU and to keep one long request from running alone at the end; but every split
costs its partial result's round trip through memory and the combine's reading of it, and with a fixed count
short requests leave most splits empty (cheap, but still launched).

`partial` is one flat float32 buffer (`partial_numel`): the split outputs `[rows, Hq, num_splits, D]` first,
then the log-sum-exps `[rows, Hq, num_splits]`, in base 2 (the kernels use exp2). Its layout depends on
`rows`, which is fixed for a captured graph.
"""

from __future__ import annotations

import math
import os

import torch

from minisgl.kernels import pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

# Tuning knobs, all guesses until timed on the GPU (scripts/bench_attention.py): 64 tokens (4 pages) per
# block, 4 warps, 2 pipeline stages for the split kernel.
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
COMBINE_WARPS = 2
# `splits_for`: enough programs for about two per SM, each split at least MIN_SPLIT_TOKENS long, and a
# long request cut into shares of at most MAX_SPLIT_TOKENS so it does not finish alone after the others.
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 128
MAX_SPLIT_TOKENS = 512
MAX_SPLITS = 32
MIN_GROUP_ROWS = 16  # tl.dot's smallest M

LOG2E = 1.4426950408889634
# The interpreter is chosen when the kernels are defined; see `dot_f32` for why the kernels need to know.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def splits_for(max_batch_rows: int, max_seq_len_hint: int, num_sms: int = 132, num_kv_heads: int = 2) -> int:
    """A split count for a launch of up to `max_batch_rows` requests of up to `max_seq_len_hint` tokens."""
    to_fill = math.ceil(PROGRAMS_PER_SM * num_sms / max(1, max_batch_rows * num_kv_heads))
    to_balance = math.ceil(max_seq_len_hint / MAX_SPLIT_TOKENS)
    worth_it = math.ceil(max_seq_len_hint / MIN_SPLIT_TOKENS)
    return max(1, min(max(to_fill, to_balance), worth_it, MAX_SPLITS))


def split_plan(
    rows: int, max_seq_len_hint: int, num_sms: int = 132, num_kv_heads: int = 2
) -> tuple[int, int]:
    """(num_splits, min_split_tokens) for a launch of `rows` requests: `splits_for`'s count, and a smallest
    share that grows with the batch, one block per wave of (request, KV head) programs over the SMs.

    Measured on the H200 (scripts/bench_attention.py, 2026-11-29): at 256 requests of 160 tokens one split
    takes 13.7 us and eight 19.8 us, while at 140 requests of 100..2048 tokens eight take 32.1 us and one
    60.3 us; the smallest share keeps both near their best with one split count per graph size."""
    waves = -(-rows * num_kv_heads // num_sms)
    return splits_for(rows, max_seq_len_hint, num_sms, num_kv_heads), waves * BLOCK_N


def partial_numel(rows: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    return rows * num_heads * num_splits * (head_dim + 1)


def alloc_partial(rows: int, num_heads: int, head_dim: int, num_splits: int, device) -> torch.Tensor:
    return torch.empty(
        partial_numel(rows, num_heads, head_dim, num_splits), dtype=torch.float32, device=device
    )


def alloc_counters(rows: int, num_kv_heads: int, device) -> torch.Tensor:
    """The fused combine's arrival counters; they must start at zero, and the kernel leaves them at zero."""
    return torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    seq_len: torch.Tensor,
    out: torch.Tensor | None = None,
    partial: torch.Tensor | None = None,
    num_splits: int = 1,
    *,
    min_split_tokens: int = 0,
    fused_combine: bool = False,
    counters: torch.Tensor | None = None,
    sm_scale: float | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """Attention of one new query token per request over its paged KV cache; returns `out`.

    q: [n, Hq, D] (last dim contiguous); k_cache, v_cache: [pages, page_size, Hkv, D] (last dim contiguous);
    kv_indptr: int32 [n + 1] and kv_indices: int32, request r's pages being
    `kv_indices[kv_indptr[r]:kv_indptr[r + 1]]`; seq_len: int32 [n], >= 1, the new token included.
    out: [n, Hq, D] in q's dtype; partial: float32 with at least `partial_numel(n, Hq, D, num_splits)`
    elements; counters (fused_combine only): int32 [>= n * Hkv], zero, `alloc_counters`; min_split_tokens:
    no split takes fewer tokens than this (rounded up to a block), see `split_plan`. Given all buffers,
    the call allocates nothing and never waits on the device, so it can be captured in a CUDA graph and
    replayed after the page tables and lengths have changed in place.
    """
    n, hq, d = q.shape
    _, page_size, hkv, dk = k_cache.shape
    if dk != d or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"q {tuple(q.shape)} and the caches {tuple(k_cache.shape)} do not fit together")
    if hq % hkv or d < 16 or d & (d - 1) or q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("needs Hq a multiple of Hkv, a power-of-two head_dim >= 16, contiguous heads")
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [n, Hq, D] with contiguous heads, got {tuple(out.shape)}")
    if partial is None:
        partial = alloc_partial(n, hq, d, num_splits, q.device)
    if partial.dtype != torch.float32 or partial.numel() < partial_numel(n, hq, d, num_splits):
        raise ValueError("partial must be float32 with at least partial_numel(n, Hq, D, num_splits) elements")
    if fused_combine and counters is None:
        counters = alloc_counters(n, hkv, q.device)
    if n == 0:
        return out
    # With one split each program holds a whole row and writes the output itself: no partials, no combine
    # (at 512 rows of a token-row graph the combine kernel alone took 5.5 us a layer).
    direct = num_splits == 1
    part_o = partial
    part_lse = partial[n * hq * num_splits * d :]
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E
    s_pad = max(2, triton.next_power_of_2(num_splits))
    min_share = -(-min_split_tokens // block_n) * block_n
    _split_kernel[(n, hkv, num_splits)](
        q,
        q.stride(0),
        q.stride(1),
        k_cache,
        v_cache,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        kv_indptr,
        kv_indices,
        seq_len,
        part_o,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        counters if fused_combine else seq_len,  # an unused pointer when not fused
        scale,
        num_splits,
        min_share,
        S_PAD=s_pad,
        HQ=hq,
        HKV=hkv,
        GROUP=group,
        GROUP_PAD=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        D=d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        FUSED=fused_combine and not direct,
        IEEE_DOT=q.dtype == torch.float32 or INTERPRETED,
        **pdl.launch_args(q),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not fused_combine and not direct:
        _combine_kernel[(n, hq)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            seq_len,
            num_splits,
            min_share,
            HQ=hq,
            S_PAD=s_pad,
            D=d,
            BLOCK_N=block_n,
            num_warps=COMBINE_WARPS,
            **pdl.launch_args(q),
        )
    return out


if triton is not None:
    from minisgl.kernels.pdl import wait_previous

    @triton.jit
    def dot_f32(a, b, IEEE: tl.constexpr):
        """a @ b in float32. IEEE: exact float32 products, for float32 caches (the default would be tf32),
        and in the interpreter, whose dot multiplies bf16 operands' raw bits as integers (Triton 3.9); the
        operands are widened after any rounding to the cache's dtype, so the result is the same."""
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") if IEEE else tl.dot(a, b)

    @triton.jit
    def _combine_head(
        part_o_ptr,
        part_lse_ptr,
        out_ptr,
        stride_on,
        stride_oh,
        row,
        head,
        num_splits,
        HQ: tl.constexpr,
        S_PAD: tl.constexpr,
        D: tl.constexpr,
        CACHE: tl.constexpr,
    ):
        """out[row, head] from the splits' partial results, each weighted by 2^(its lse - the largest)."""
        splits = tl.arange(0, S_PAD)
        dims = tl.arange(0, D)
        base = (row * HQ + head) * num_splits
        lse = tl.load(
            part_lse_ptr + base + splits, mask=splits < num_splits, other=float("-inf"), cache_modifier=CACHE
        )
        # Split 0 always holds the first token (seq_len >= 1), so the largest lse is finite.
        w = tl.exp2(lse - tl.max(lse, axis=0))
        # An empty split never wrote its output: its slot may hold anything, NaN included, so it is not read.
        used = lse > float("-inf")
        o = tl.load(
            part_o_ptr + (base + splits)[:, None] * D + dims[None, :],
            mask=used[:, None],
            other=0.0,
            cache_modifier=CACHE,
        )
        acc = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + row * stride_on + head * stride_oh + dims, acc.to(out_ptr.dtype.element_ty))

    # The page tables and lengths are slices of the step's packed buffer at any offset: specialising on their
    # alignment would compile a variant per offset class in the middle of serving (eager decode steps).
    @triton.jit(do_not_specialize=["indptr_ptr", "indices_ptr", "seq_len_ptr"])
    def _split_kernel(
        q_ptr,
        stride_qn,
        stride_qh,
        k_ptr,
        v_ptr,
        stride_page,
        stride_slot,
        stride_kvh,
        indptr_ptr,
        indices_ptr,
        seq_len_ptr,
        part_o_ptr,
        part_lse_ptr,
        out_ptr,
        stride_on,
        stride_oh,
        counter_ptr,
        scale,
        num_splits,
        min_share,
        S_PAD: tl.constexpr,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FUSED: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # The lengths and page tables come from the step's upload, before the graph: no kernel writes them,
        # so they are read before the wait, which then hides two dependent loads. q and this step's K/V
        # come from the kernel before.
        length = tl.load(seq_len_ptr + row)
        page_base = tl.load(indptr_ptr + row).to(tl.int64)
        last_page = tl.load(indptr_ptr + row + 1) - page_base - 1
        wait_previous(PDL)
        share = _share(length, num_splits, min_share, BLOCK_N)
        start = split * share
        end = tl.minimum(start + share, length)

        g = tl.arange(0, GROUP_PAD)
        heads = kvh * GROUP + g
        dims = tl.arange(0, D)
        live = g < GROUP
        q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + dims[None, :], mask=live[:, None])

        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D], tl.float32)
        for first in range(start, end, BLOCK_N):
            tok = first + tl.arange(0, BLOCK_N)
            valid = tok < end
            # Clamped as well as masked: a slot past the request's table is never even addressed.
            slot = tl.minimum(tok // PAGE_SIZE, last_page)
            page = tl.load(indices_ptr + page_base + slot, mask=valid, other=0).to(tl.int64)
            kv_off = page * stride_page + (tok % PAGE_SIZE) * stride_slot + kvh * stride_kvh
            kv_ptrs = kv_off[:, None] + dims[None, :]
            k = tl.load(k_ptr + kv_ptrs, mask=valid[:, None], other=0.0)
            s = dot_f32(q, tl.trans(k), IEEE_DOT)
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            # Every block has its first token valid, so the new maximum is finite.
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            v = tl.load(v_ptr + kv_ptrs, mask=valid[:, None], other=0.0)
            pv = dot_f32(p.to(v.dtype), v, IEEE_DOT)
            acc = acc * alpha[:, None] + pv
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new

        # An empty split writes no output rows (the combine does not read them). Spelt as a row bound, not
        # `live & (start < length)`: Triton 3.9's interpreter turns that into an int32 mask.
        rows_out = tl.where(start < length, GROUP, 0)
        safe = tl.where(denom > 0, denom, 1.0)
        lse = tl.where(denom > 0, m + tl.log2(safe), float("-inf"))
        # A row that fits the first split's share (a short request: the share is at least min_share) is that
        # split's alone: it writes the output itself, as with one split, and the combine leaves the row be,
        # which saved the partials' round trip and the combine's work at 256 short rows. The fused combine
        # counts every split's arrival, so it always combines.
        # With one split the share always holds the whole row: every row is alone, no combine needed.
        alone = length <= share
        if FUSED:
            alone = length < 0
        if alone:
            out_ptrs = out_ptr + row * stride_on + heads[:, None] * stride_oh + dims[None, :]
            tl.store(
                out_ptrs, (acc / safe[:, None]).to(out_ptr.dtype.element_ty), mask=(g < rows_out)[:, None]
            )
        else:
            base = (row * HQ + heads) * num_splits + split
            tl.store(part_lse_ptr + base, lse, mask=live)
            tl.store(
                part_o_ptr + base[:, None] * D + dims[None, :],
                acc / safe[:, None],
                mask=(g < rows_out)[:, None],
            )

            if FUSED:
                # Every thread's stores must precede the one thread's release of the counter.
                tl.debug_barrier()
                counter = counter_ptr + row * HKV + kvh
                arrived = tl.atomic_add(counter, 1, sem="acq_rel")
                if arrived == num_splits - 1:
                    # The other splits' results were written by other SMs: read them from L2, not a stale L1.
                    for j in tl.static_range(GROUP):
                        _combine_head(
                            part_o_ptr,
                            part_lse_ptr,
                            out_ptr,
                            stride_on,
                            stride_oh,
                            row,
                            kvh * GROUP + j,
                            num_splits,
                            HQ,
                            S_PAD,
                            D,
                            ".cg",
                        )
                    tl.store(counter, 0)

    @triton.jit(do_not_specialize=["seq_len_ptr"])  # a slice of the packed upload, as in `_split_kernel`
    def _combine_kernel(
        part_o_ptr,
        part_lse_ptr,
        out_ptr,
        stride_on,
        stride_oh,
        seq_len_ptr,
        num_splits,
        min_share,
        HQ: tl.constexpr,
        S_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        length = tl.load(seq_len_ptr + row)  # uploaded: no kernel writes it
        # Every program waits, those with nothing to do too: the kernel after this one waits for this one
        # only, so this one must not end before the split kernel.
        wait_previous(PDL)
        # A row its first split held alone has its output already (`_split_kernel`).
        if length > _share(length, num_splits, min_share, BLOCK_N):
            _combine_head(
                part_o_ptr,
                part_lse_ptr,
                out_ptr,
                stride_on,
                stride_oh,
                row,
                tl.program_id(1),
                num_splits,
                HQ,
                S_PAD,
                D,
                "",
            )

    @triton.jit
    def _share(length, num_splits, min_share, BLOCK_N: tl.constexpr):
        """A split's share of a row's tokens: an even share, rounded up to whole blocks so only a share's
        last block is partial, and at least min_share tokens (a multiple of BLOCK_N), so that in a large
        batch a short request stays in one split instead of spreading a few tokens over many."""
        return tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N, min_share)
