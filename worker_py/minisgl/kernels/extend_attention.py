"""Paged attention for extend steps in Triton (CUDA only), with no host-side plan: safe to capture in a CUDA
graph at a token count, whatever the requests and lengths of the steps replayed in it.

An extend step's new tokens attend causally to their request's cached prefix and to the new tokens up to
their own. FlashInfer's prefill plans its tiles on the host from the lengths, so an extend step runs eagerly,
and an eager step's hundreds of launches from Python cost 10 to 13 ms of host time whatever its size
(docs/benchmarks.md); captured at a token count, the step costs one replay.

The grid depends only on bounds: `cdiv(tokens, BLOCK_M) + requests` blocks (each request's new tokens in
blocks of BLOCK_M, its last block perhaps partial, so at most one block more per request than the tokens
need), times the KV heads. Each program reads the query lengths from `qo_indptr` on the device, finds the
request and block it owns by a prefix sum of the requests' block counts, and leaves at once if there is none
(the bound's spare blocks, padding requests of no tokens). Rows past the last request's tokens (a padded
step's padding tokens) belong to no block: their output is never written.

A program takes BLOCK_M new tokens of one request and every query head of one KV head: the tile's rows are
(token, head in the group) pairs, the group padded to a power of two, so K and V are read once per group.
It walks the request's keys in blocks of BLOCK_N up to its last token's position, finds each key's page
through the request's page table, masks keys past each row's own position, and keeps a float32 online
softmax, in base 2.

With `num_splits` S > 1, each block's keys are walked by S programs, each taking a 1/S share (whole BLOCK_N
blocks): a chunk after a long cached prefix has few blocks, and one program per block left most SMs idle
(2.2x FlashInfer's time on an H100, docs/benchmarks.md). Each writes its share's unnormalised float32 output
with its running maximum and sum; a second kernel weighs the S shares of each real token together.
"""

from __future__ import annotations

import torch

from minisgl.kernels import pdl
from minisgl.kernels.decode_attention import INTERPRETED, LOG2E
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

# Tiles of 128 (token, head) rows (16 tokens of Qwen2.5's groups of 7 heads padded to 8), 64 keys a block,
# 2 stages; 8 warps with one program a block, 4 with shares. Timed on an H100 and an H200
# (`scripts/bench_extend_attention.py --variants`, docs/benchmarks.md, 2026-12-07): 8 warps beat 4 in every
# case with one program a block (8% on a 8192-token prompt, 21% on a chunk after 4096 cached tokens) and
# gain nothing with shares; tiles of 64 rows win on that chunk but lose 30% on long prompts; 256 rows, 128
# keys a block or 3 stages win nothing.
TILE_ROWS = 128
BLOCK_N = 64
NUM_WARPS = 8
SHARED_WARPS = 4
NUM_STAGES = 2
# `splits_for`: shares enough for about two programs an SM when a single prompt fills the step, at most four.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 4


def splits_for(tokens: int, num_heads: int, num_kv_heads: int, num_sms: int) -> int:
    """How many programs share each block's keys in a launch of `tokens` new tokens, chosen from the token
    count alone, so that a graph captured at it takes one count for every step it replays.

    Few tokens mean few blocks, and a block after a long cached prefix walks many keys: on an H200 a
    chunk of 512 after 4096 cached tokens took 163 us a layer in one program a block and 49 in four shares
    (FlashInfer 74), one prompt of 512 24 against 16. Shares cost a float32 round trip and a combine, which
    lose where the blocks already fill the GPU: four prompts of 512 took 28 us in one program a block, 36 in
    four shares and 30 in two (docs/benchmarks.md, 2026-12-07)."""
    programs = -(-tokens // block_tokens(num_heads, num_kv_heads)) * num_kv_heads
    return max(1, min(MAX_SPLITS, -(-PROGRAMS_PER_SM * num_sms // max(1, programs))))


def block_tokens(num_heads: int, num_kv_heads: int, tile_rows: int = TILE_ROWS) -> int:
    """New tokens per block: a tile's rows divided among the group's (padded) heads."""
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    return max(1, tile_rows // group_pad)


def num_blocks(tokens: int, requests: int, block_m: int) -> int:
    """The grid's blocks for a step of at most `tokens` new tokens over at most `requests` requests."""
    return -(-tokens // block_m) + requests


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    seq_len: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    sm_scale: float | None = None,
    tile_rows: int = TILE_ROWS,
    block_n: int = BLOCK_N,
    num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
    num_splits: int = 1,
) -> torch.Tensor:
    """Causal attention of an extend step's new tokens over their requests' paged KV caches; returns `out`.

    q: [t, Hq, D] (last dim contiguous), the new tokens of every request one after another, and perhaps
    padding tokens after the last request's; k_cache, v_cache: [pages, page_size, Hkv, D] (last dim
    contiguous), holding the new tokens' K/V already; qo_indptr: int32 [n + 1], request r's new tokens being
    rows `qo_indptr[r]:qo_indptr[r + 1]` of q (a request may have none); kv_indptr: int32 [n + 1] and
    kv_indices: int32, request r's pages being `kv_indices[kv_indptr[r]:kv_indptr[r + 1]]`; seq_len: int32
    [n], each request's length with its new tokens (its new tokens are its last positions). out: [t, Hq, D]
    in q's dtype; the rows of padding tokens are left as they were. `num_splits`: how many programs share
    each block's keys (the shares are then combined by a second kernel; `splits_for` chooses a count);
    `num_warps` defaults to NUM_WARPS with one program a block, SHARED_WARPS with shares. The call allocates
    nothing but `out` when it is not given (and, with splits, the shares' float32 buffers) and never waits on
    the device: it can be captured in a CUDA graph and replayed after the tables and lengths have changed in
    place.
    """
    t, hq, d = q.shape
    _, page_size, hkv, dk = k_cache.shape
    n = seq_len.shape[0]
    if dk != d or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"q {tuple(q.shape)} and the caches {tuple(k_cache.shape)} do not fit together")
    if hq % hkv or d < 16 or d & (d - 1) or q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("needs Hq a multiple of Hkv, a power-of-two head_dim >= 16, contiguous heads")
    if qo_indptr.shape[0] != n + 1 or kv_indptr.shape[0] != n + 1:
        raise ValueError(f"qo_indptr and kv_indptr must have {n + 1} entries for {n} requests")
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be [t, Hq, D] with contiguous heads, got {tuple(out.shape)}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    if t == 0 or n == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    block_m = block_tokens(hq, hkv, tile_rows)
    # The shares: [splits, t, Hq] rows of D sums, and each row's maximum and sum of weights.
    shares = out, out, out  # unused placeholders without splits
    if num_splits > 1:
        shares = (
            torch.empty(num_splits, t, hq, d, dtype=torch.float32, device=q.device),
            torch.empty(num_splits, t, hq, dtype=torch.float32, device=q.device),
            torch.empty(num_splits, t, hq, dtype=torch.float32, device=q.device),
        )
    _extend_kernel[(num_blocks(t, n, block_m), hkv, num_splits)](
        q,
        q.stride(0),
        q.stride(1),
        k_cache,
        v_cache,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        qo_indptr,
        kv_indptr,
        kv_indices,
        seq_len,
        out,
        out.stride(0),
        out.stride(1),
        (d**-0.5 if sm_scale is None else sm_scale) * LOG2E,
        n,
        *shares,
        t,
        N_PAD=max(2, triton.next_power_of_2(n)),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        D=d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        SPLITS=num_splits,
        IEEE_DOT=q.dtype == torch.float32 or INTERPRETED,
        **pdl.launch_args(q),
        num_warps=num_warps or (NUM_WARPS if num_splits == 1 else SHARED_WARPS),
        num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(t,)](
            *shares,
            out,
            out.stride(0),
            out.stride(1),
            qo_indptr,
            n,
            t,
            HQ=hq,
            HQ_PAD=triton.next_power_of_2(hq),
            D=d,
            SPLITS=num_splits,
            **pdl.launch_args(q),
        )
    return out


if triton is not None:
    from minisgl.kernels.decode_attention import dot_f32
    from minisgl.kernels.pdl import wait_previous

    # The tables and lengths are slices of the step's packed buffer at any offset: specialising on their
    # alignment would compile a variant per offset class in the middle of serving.
    @triton.jit(do_not_specialize=["qo_indptr_ptr", "kv_indptr_ptr", "indices_ptr", "seq_len_ptr", "n", "t"])
    def _extend_kernel(
        q_ptr,
        stride_qt,
        stride_qh,
        k_ptr,
        v_ptr,
        stride_page,
        stride_slot,
        stride_kvh,
        qo_indptr_ptr,
        kv_indptr_ptr,
        indices_ptr,
        seq_len_ptr,
        out_ptr,
        stride_ot,
        stride_oh,
        scale,
        n,
        share_acc_ptr,
        share_max_ptr,
        share_sum_ptr,
        t,
        N_PAD: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        PDL: tl.constexpr,
    ):
        wait_previous(PDL)
        block = tl.program_id(0)
        kvh = tl.program_id(1)

        # Which request's which block: the requests' block counts, their running sum, and the first
        # request whose running sum passes this block.
        reqs = tl.arange(0, N_PAD)
        starts = tl.load(qo_indptr_ptr + reqs, mask=reqs < n, other=0)
        ends = tl.load(qo_indptr_ptr + reqs + 1, mask=reqs < n, other=0)
        blocks = tl.cdiv(ends - starts, BLOCK_M)
        through = tl.cumsum(blocks, axis=0)
        req = tl.sum((through <= block).to(tl.int32), axis=0)
        # A spare block (past every request's blocks) is counted as one more block of the last request: its
        # rows start past that request's tokens, so it writes nothing, and it walks no keys.
        spare = req >= n
        req = tl.minimum(req, n - 1)
        q_start = tl.load(qo_indptr_ptr + req)
        q_end = tl.load(qo_indptr_ptr + req + 1)
        first_tok = q_start + (block - tl.sum(tl.where(reqs < req, blocks, 0), axis=0)) * BLOCK_M
        length = tl.load(seq_len_ptr + req)
        prefix = length - (q_end - q_start)  # cached positions before the new tokens
        page_base = tl.load(kv_indptr_ptr + req).to(tl.int64)
        last_page = tl.load(kv_indptr_ptr + req + 1) - page_base - 1

        # Row i of the tile: new token first_tok + i // GROUP_PAD, query head i % GROUP_PAD of the group.
        rows = tl.arange(0, BLOCK_M * GROUP_PAD)
        tok = first_tok + rows // GROUP_PAD
        head = kvh * GROUP + rows % GROUP_PAD
        live = (tok < q_end) & (rows % GROUP_PAD < GROUP)
        dims = tl.arange(0, D)
        tok64 = tok.to(tl.int64)
        # Rows past the request's tokens (or the group) read zeros: finite scores, never stored.
        q_ptrs = q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=live[:, None], other=0.0)
        pos = prefix + (tok - q_start)  # each row's own position: it sees keys up to and including it
        # The block's keys: up to its last token's position (the request's last, at most).
        end = tl.where(spare, 0, tl.minimum(prefix + (first_tok - q_start) + BLOCK_M, length))

        m = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * GROUP_PAD, D], tl.float32)
        # This program's share of the keys: all of them, or its 1/SPLITS of them in whole blocks of BLOCK_N.
        lo = 0
        hi = end
        if SPLITS > 1:
            share = tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N) * BLOCK_N
            lo = tl.program_id(2) * share
            hi = tl.minimum(end, lo + share)
        for first in range(lo, hi, BLOCK_N):
            key = first + tl.arange(0, BLOCK_N)
            valid = key < hi
            # Clamped as well as masked: a slot past the request's table is never even addressed.
            slot = tl.minimum(key // PAGE_SIZE, last_page)
            page = tl.load(indices_ptr + page_base + slot, mask=valid, other=0).to(tl.int64)
            kv_off = page * stride_page + (key % PAGE_SIZE) * stride_slot + kvh * stride_kvh
            kv_ptrs = kv_off[:, None] + dims[None, :]
            k = tl.load(k_ptr + kv_ptrs, mask=valid[:, None], other=0.0)
            s = dot_f32(q, tl.trans(k), IEEE_DOT)
            seen = valid[None, :] & (key[None, :] <= pos[:, None])
            s = tl.where(seen, s * scale, float("-inf"))
            # Key 0 is in the first block and every row's position is at least 0: the maximum is finite from
            # the first block on, and a later block a row sees none of adds nothing (2^-inf = 0). A share
            # past key 0 may hold no key a row sees yet: its maximum stays -inf (so the combine weighs it 0),
            # and 0 stands in for it in the exponents, which would be -inf - -inf.
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = m_new
            if SPLITS > 1:
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - shift[:, None])
            alpha = tl.exp2(m - shift)
            v = tl.load(v_ptr + kv_ptrs, mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + dot_f32(p.to(v.dtype), v, IEEE_DOT)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        if SPLITS == 1:
            o = acc / denom[:, None]
            tl.store(
                out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=live[:, None],
            )
        else:
            # Every live row's share is written, an empty one too (maximum -inf, sums 0): the combine reads
            # all SPLITS of each real token.
            row = (tl.program_id(2) * t + tok64) * (GROUP * tl.num_programs(1)) + head
            tl.store(share_acc_ptr + row[:, None] * D + dims[None, :], acc, mask=live[:, None])
            tl.store(share_max_ptr + row, m, mask=live)
            tl.store(share_sum_ptr + row, denom, mask=live)

    @triton.jit(do_not_specialize=["qo_indptr_ptr", "n", "t"])
    def _combine_kernel(
        share_acc_ptr,
        share_max_ptr,
        share_sum_ptr,
        out_ptr,
        stride_ot,
        stride_oh,
        qo_indptr_ptr,
        n,
        t,
        HQ: tl.constexpr,
        HQ_PAD: tl.constexpr,
        D: tl.constexpr,
        SPLITS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One token's heads: its SPLITS shares weighed by 2^(share's maximum - the largest); padding
        tokens (past the last request's) are left alone."""
        wait_previous(PDL)
        tok = tl.program_id(0)
        if tok < tl.load(qo_indptr_ptr + n):
            heads = tl.arange(0, HQ_PAD)
            real = heads < HQ
            dims = tl.arange(0, D)
            top = tl.full([HQ_PAD], float("-inf"), tl.float32)
            for split in tl.static_range(SPLITS):
                row = (split * t + tok) * HQ + heads
                top = tl.maximum(top, tl.load(share_max_ptr + row, mask=real, other=float("-inf")))
            # Share 0 holds key 0, which every row sees: `top` is finite on real heads.
            top = tl.where(real, top, 0.0)
            acc = tl.zeros([HQ_PAD, D], tl.float32)
            denom = tl.zeros([HQ_PAD], tl.float32)
            for split in tl.static_range(SPLITS):
                row = (split * t + tok) * HQ + heads
                w = tl.exp2(tl.load(share_max_ptr + row, mask=real, other=float("-inf")) - top)
                part = share_acc_ptr + row[:, None] * D + dims[None, :]
                acc += w[:, None] * tl.load(part, mask=real[:, None], other=0.0)
                denom += w * tl.load(share_sum_ptr + row, mask=real, other=1.0)
            o = acc / denom[:, None]
            tok64 = tok.to(tl.int64)
            tl.store(
                out_ptr + tok64 * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=real[:, None],
            )
