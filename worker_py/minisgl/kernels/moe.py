"""Qwen3-MoE's mixture of experts: routing, a plain torch reference, and a fused Triton path (CUDA only).

Layout (token-packed, no batch axis): x [t, H]; w13 [E, 2I, H], each expert's gate rows then its up rows
(HF's `experts.gate_up_proj`); w2 [E, H, I] (HF's `experts.down_proj`); routing weights [t, k] float32 and
expert ids [t, k] int32 from `route`. A (token, slot) pair is numbered token * k + slot.

HF transformers 5.x (`modeling_qwen3_moe.py`, `integrations/moe.py`), with `dt` the hidden dtype:
1. Router (`Qwen3MoeTopKRouter`): logits = x @ gate^T in `dt`; softmax over all E experts in float32; top-k
   (torch.topk: descending); with `norm_topk_prob` divided by their float32 sum; then cast to `dt` (rounded
   to bf16 in a bf16 model). `route` returns the float32 values before that cast; `moe_reference` and
   `fused_moe` cast them to `dt` themselves, where HF does.
2. Per expert e, over its pairs: gate, up = x @ w13[e]^T, each rounded to `dt`; silu(gate) rounded; times up,
   rounded; @ w2[e]^T, rounded; times the pair's `dt` weight, rounded.
3. The sum over a token's k pairs depends on `config._experts_implementation`:
   - "grouped_mm", what `PreTrainedModel.__init__` (so `from_pretrained` too) picks by default whenever torch
     has a grouped matmul (torch >= 2.9, CPU and CUDA): the weighted pair outputs [t*k, H] are put back in
     pair order and `.view(t, k, H).sum(dim=1)`: float32 accumulation in slot order (top-k order), rounded
     to `dt` once. Its grouped matmul gives per-expert `F.linear`'s bits on the CPU (checked in the tests).
   - "eager" (the decorated `Qwen3MoeExperts.forward`; also what a bare `Qwen3MoeSparseMoeBlock` built from a
     config that no model has seen runs): `index_add_` into a `dt` zero tensor, one expert after another
     in ascending expert id, so in bf16 every partial sum is rounded to bf16.
   We follow "grouped_mm", the HF model our end-to-end comparisons load. In float32 the two differ only in
   the order of the k float32 additions (~1e-7 relative); in bf16 eager also rounds after every add.
`moe_reference` is HF's grouped_mm computation batched by expert (one host sync for the per-expert counts,
one GEMM pair per hit expert, same ops in the same dtypes), so in float32 on the CPU it gives HF's bits.

`fused_moe` (an align step and three launches; nothing reads the device from the host):
- align (`_align_kernel`, one launch of E programs): the t*k pairs sorted by expert (stable), each expert's
  run padded to a multiple of BLOCK_M with the pad value t*k, into a buffer of fixed size
  t*k + min(E, t*k)*(BLOCK_M-1) rounded down to whole blocks (at most min(E, t*k) experts are hit, each
  wasting at most BLOCK_M-1 slots), plus every block's expert and the padded total, all computed on the
  device, so the whole call can be captured in a CUDA graph. (`_align_torch` does the same with torch's
  sort; it is the tests' reference, too slow on the host to be the path: ~750 us a call on the H200.)
- `_gate_up_kernel`: grouped GEMM, one program per (block of sorted pairs, block of I columns): gathers the
  block's token rows of x, reads the same columns of the expert's gate and up halves, and writes
  silu(gate) * up into h [t*k, I], rounded as in 2. Blocks past the padded total return at once.
- `_down_kernel`: h @ w2[e]^T the same way, times the pair's weight, rounded as in 2, into y [t*k, H].
- `_sum_kernel`: per token, its k rows of y added in slot order in float32, rounded once, as in 3.
So the one difference from HF is inside the GEMMs: both accumulate in float32, but cuBLAS/MKL and `tl.dot`
add the H (or I) products in different orders, so a value near a bf16 rounding boundary may round the other
way (one bf16 step), which then propagates. In float32 the kernels use IEEE float32 dots (no TF32) and agree
with the reference to float32 rounding error, not bit for bit.

Tiles (`tile_for`): picked from a sweep on the H200 (`scripts/bench_moe.py --sweep`). Decode-sized batches,
a few rows per expert, take BLOCK_M=16 (tl.dot's smallest) and a long K step, as the work is streaming the
experts' weights; prefill-sized ones take 64- and 128-row blocks.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: only the reference runs
    triton = None
    tl = None

# The interpreter is chosen when kernels are defined. Its tl.dot multiplies bf16 operands' raw bits as
# integers (Triton 3.9), so interpreted kernels widen the operands to float32 first (exact: the products
# of two bf16 values are exact in float32, and the accumulation is float32 either way).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


# --------------------------------------------------------------------------------------------- routing


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[t, E] logits -> (weights [t, k] float32, ids [t, k] int32), as HF Qwen3-MoE routes: softmax in
    float32 over all experts, top-k, renormalised to sum 1 when `renormalize` (norm_topk_prob). HF then
    casts the weights to the logits' dtype; the MoE functions here do that cast themselves."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


# ------------------------------------------------------------------------------------------- reference


def moe_reference(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Plain torch (the CPU path and the GPU kernel's reference). x [t, H]; w13 [E, 2I, H] (each expert's gate
    rows then up rows); w2 [E, H, I]; weights [t, k] float32; ids [t, k]. Returns [t, H] in x.dtype.

    HF's grouped_mm experts, batched by expert: one stable sort of the pairs by expert and one host sync for
    the per-expert counts, one GEMM pair per hit expert over its gathered rows, the weighted outputs put in
    pair order and summed over the k slots (see the module docstring)."""
    t, k = ids.shape
    num_experts, hidden = w13.shape[0], x.shape[1]
    if t == 0:
        return torch.zeros_like(x)
    w = weights.to(x.dtype).reshape(-1)  # HF: router_top_value.to(router_logits.dtype)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    y = torch.zeros(t * k, hidden, dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        gate, up = F.linear(x[pairs // k], w13[e]).chunk(2, dim=-1)
        y[pairs] = F.linear(F.silu(gate) * up, w2[e]) * w[pairs, None]
    return y.view(t, k, hidden).sum(dim=1)


# ------------------------------------------------------------------------------------------------ tiles


class MoeTile(NamedTuple):
    block_m: int  # sorted (token, slot) pairs per program; every expert's run is padded to a multiple
    block_n: int  # output columns per program (of I in the gate/up GEMM, of H in the down GEMM)
    block_k: int
    group_m: int  # programs along M that share a column block before moving on (L2 reuse of weights)
    num_warps: int
    num_stages: int


# tile_for's tiles. Measured with scripts/bench_moe.py --sweep on the H200 (torch 2.11, Triton 3.6,
# 2026-12-04; graph replay, us, best of 26 tiles vs the one picked here):
#   E=128 k=8 H=2048 I=768:  t=1 46 (SMALL)  t=16 316 vs 319 (SMALL)  t=256 399 (MEDIUM)  t=2048 674 (LARGE)
#   E=8 k=2 H=1024 I=512:    t=1 16 vs 17 (SMALL)  t=16 20 (SMALL)  t=256 40 (WIDE)  t=2048 149 (WIDE)
# GROUP_M 1 and 8 timed the same everywhere. (That sweep still aligned with torch's sort above 1024 pairs,
# the same for every tile.) With these tiles and `_align_kernel`, the same H200, whole fused_moe in a graph:
#   E=128 k=8 H=2048 I=768:  t=1 34.7 us, t=16 218, t=256 342, t=2048 589 (262 TFLOP/s)
#   E=8 k=2 H=1024 I=512:    t=1 15.8 us, t=16 18.3, t=256 21.6, t=2048 61.7
# Eager, Triton 3.6's launches cost the host about 40 us each (t=1: 190 us of host time a call).
SMALL_TILE = MoeTile(16, 64, 128, 1, 4, 4)  # a row or a few per expert (decode): streaming the weights
MEDIUM_TILE = MoeTile(32, 64, 128, 1, 4, 4)
WIDE_TILE = MoeTile(64, 64, 64, 1, 4, 4)  # many rows per expert but too few 128x128 tiles to fill the GPU
LARGE_TILE = MoeTile(128, 128, 64, 1, 8, 3)
NUM_SMS = 132  # the H200's


def tile_for(num_tokens: int, top_k: int, num_experts: int, inter: int) -> MoeTile:
    """A tile for `num_tokens` tokens, by the rows an expert gets on average (t*k/E): decode batches give
    each hit expert a row or a few, so the smallest M tile (tl.dot's 16) and a long K step keep the weight
    stream going; prefill batches give each expert hundreds of rows and want large tiles, as long as there
    are enough of them (t*k*I / 128^2 gate/up programs) for a few waves over the SMs."""
    rows_per_expert = num_tokens * top_k / max(1, num_experts)
    if rows_per_expert <= 12:
        return SMALL_TILE
    if rows_per_expert <= 48:
        return MEDIUM_TILE
    if num_tokens * top_k * inter >= 4 * NUM_SMS * 128 * 128:
        return LARGE_TILE
    return WIDE_TILE


# ------------------------------------------------------------------------------------------------ align


class Alignment(NamedTuple):
    sorted_pairs: torch.Tensor  # [capacity] int32: pair index token*k + slot, or num_pairs for padding
    block_expert: torch.Tensor  # [capacity // block_m] int32: the expert of each block (E past the end)
    total: torch.Tensor  # [1] int32: the padded number of sorted pairs (a multiple of block_m)


def align_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The sorted-pair buffer's worst-case length, rounded down to whole blocks (the padded total is a
    multiple of block_m and never exceeds num_pairs + min(E, num_pairs) * (block_m - 1))."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return worst // block_m * block_m


def align(ids: torch.Tensor, num_experts: int, block_m: int, use_kernel: bool | None = None) -> Alignment:
    """The (token, slot) pairs of `ids` [t, k] grouped by expert (stable: ascending pair index within an
    expert), each group padded to a multiple of `block_m`. No host sync; shapes depend on t, k, E only.
    `use_kernel` (default: with Triton) picks `_align_kernel` over the torch version (the tests' reference:
    a dozen launches, and on the H200 about 750 us of host time a call under torch 2.11)."""
    num_pairs = ids.numel()
    cap = align_capacity(num_pairs, num_experts, block_m)
    flat = ids.reshape(-1)
    if use_kernel is None:
        use_kernel = triton is not None
    if use_kernel:
        return _align_triton(flat, num_experts, block_m, cap)
    return _align_torch(flat, num_experts, block_m, cap)


def _align_torch(flat: torch.Tensor, num_experts: int, block_m: int, cap: int) -> Alignment:
    device = flat.device
    num_pairs = flat.numel()
    e = flat.long()
    # scatter_add_ rather than bincount: bincount's output length depends on the data (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, e, torch.ones_like(e))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    order = torch.argsort(e, stable=True)
    sorted_e = e[order]
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_e]
    sorted_pairs = torch.full((cap,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, padded_start[sorted_e] + rank, order.to(torch.int32))
    block_start = torch.arange(0, cap, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    total = padded_end[-1:].to(torch.int32)
    return Alignment(sorted_pairs, block_expert, total)


def _align_triton(flat: torch.Tensor, num_experts: int, block_m: int, cap: int) -> Alignment:
    device = flat.device
    sorted_pairs = torch.empty(cap, dtype=torch.int32, device=device)
    block_expert = torch.empty(cap // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    num_pairs = flat.numel()
    chunk = min(2048, max(128, triton.next_power_of_2(num_pairs)))
    _align_kernel[(num_experts,)](
        flat,
        sorted_pairs,
        block_expert,
        total,
        num_pairs,
        num_experts,
        cap,
        BLOCK_M=block_m,
        NUM_BINS=triton.next_power_of_2(num_experts + 1),
        CHUNK=chunk,
        num_warps=4 if chunk <= 512 else 8,
    )
    return Alignment(sorted_pairs, block_expert, total)


# ------------------------------------------------------------------------------------------------ fused


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    tile: MoeTile | None = None,
) -> torch.Tensor:
    """`moe_reference` through Triton (CUDA, or the CPU under TRITON_INTERPRET=1). No host sync: safe to
    capture in a CUDA graph. x, w13, w2 contiguous; weights [t, k] float32 (or x.dtype); ids [t, k]."""
    t, hidden = x.shape
    k = ids.shape[1]
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    out = torch.empty_like(x)
    if t == 0:
        return out
    assert w13.shape[2] == hidden and w2.shape == (num_experts, hidden, inter)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = weights.contiguous()
    ids = ids.to(torch.int32).contiguous()
    tl_tile = tile or tile_for(t, k, num_experts, inter)
    if tile is None and x.element_size() == 4:  # float32: half the K step keeps the shared memory of bf16
        tl_tile = tl_tile._replace(block_k=tl_tile.block_k // 2)
    bm, bn, bk = tl_tile.block_m, tl_tile.block_n, tl_tile.block_k
    num_pairs = t * k
    al = align(ids, num_experts, bm)
    num_blocks = al.block_expert.numel()
    ieee = x.dtype == torch.float32 or _INTERPRETED

    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks * triton.cdiv(inter, bn),)](
        x,
        w13,
        h,
        al.sorted_pairs,
        al.block_expert,
        al.total,
        num_pairs,
        inter,
        hidden,
        k,
        num_blocks,
        EVEN_K=hidden % bk == 0,
        IEEE=ieee,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=tl_tile.group_m,
        num_warps=tl_tile.num_warps,
        num_stages=tl_tile.num_stages,
    )
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_blocks * triton.cdiv(hidden, bn),)](
        h,
        w2,
        weights,
        y,
        al.sorted_pairs,
        al.block_expert,
        al.total,
        num_pairs,
        hidden,
        inter,
        num_blocks,
        EVEN_K=inter % bk == 0,
        IEEE=ieee,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=tl_tile.group_m,
        num_warps=tl_tile.num_warps,
        num_stages=tl_tile.num_stages,
    )
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_kernel[(t, triton.cdiv(hidden, block_h))](y, out, hidden, TOP_K=k, BLOCK_H=block_h, num_warps=4)
    return out


if triton is not None:
    from minisgl.kernels.rounding import round_to as _round  # where a bf16 torch op rounds

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _align_kernel(
        ids_ptr,
        sorted_ptr,
        block_expert_ptr,
        total_ptr,
        num_pairs,
        num_experts,
        cap,
        BLOCK_M: tl.constexpr,
        NUM_BINS: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        """One program per expert e. Each counts every expert's pairs itself (a histogram over all the ids,
        cheap next to a launch; a shared count would need a second launch), finds where its padded run
        starts, writes its pairs there in ascending pair order, pads the rest of its run and writes its
        blocks' expert id; program 0 also pads every slot and block past the total. All writes disjoint."""
        e = tl.program_id(0)
        lane = tl.arange(0, CHUNK)
        bins = tl.arange(0, NUM_BINS)
        counts = tl.zeros([NUM_BINS], dtype=tl.int32)
        for p0 in range(0, num_pairs, CHUNK):
            ps = p0 + lane
            # Lanes past the end count into the last bin, which no expert has (NUM_BINS > E).
            counts += tl.histogram(tl.load(ids_ptr + ps, mask=ps < num_pairs, other=NUM_BINS - 1), NUM_BINS)
        padded = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        padded_end = tl.cumsum(padded, axis=0)
        mine = bins == e
        start = tl.sum(tl.where(mine, padded_end - padded, 0), axis=0)
        count = tl.sum(tl.where(mine, counts, 0), axis=0)
        end = tl.sum(tl.where(mine, padded_end, 0), axis=0)
        seen = tl.full([], 0, tl.int32)
        for p0 in range(0, num_pairs, CHUNK):
            ps = p0 + lane
            hit = (tl.load(ids_ptr + ps, mask=ps < num_pairs, other=-1) == e).to(tl.int32)
            rank = seen + tl.cumsum(hit, axis=0) - 1
            tl.store(sorted_ptr + start + rank, ps, mask=hit > 0)
            seen += tl.sum(hit, axis=0)
        pad = start + count + tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + pad, tl.zeros([BLOCK_M], dtype=tl.int32) + num_pairs, mask=pad < end)
        for b0 in range(start // BLOCK_M, end // BLOCK_M, CHUNK):
            bs = b0 + lane
            tl.store(block_expert_ptr + bs, tl.zeros([CHUNK], dtype=tl.int32) + e, mask=bs < end // BLOCK_M)
        if e == 0:
            total = tl.sum(padded, axis=0)
            tl.store(total_ptr, total)
            for s0 in range(total, cap, CHUNK):
                ss = s0 + lane
                tl.store(sorted_ptr + ss, tl.zeros([CHUNK], dtype=tl.int32) + num_pairs, mask=ss < cap)
            for b0 in range(total // BLOCK_M, cap // BLOCK_M, CHUNK):
                bs = b0 + lane
                tl.store(
                    block_expert_ptr + bs,
                    tl.zeros([CHUNK], dtype=tl.int32) + num_experts,
                    mask=bs < cap // BLOCK_M,
                )

    @triton.jit
    def _block_coords(num_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(block of sorted pairs, block of columns) of this program, GROUP_M row blocks per column sweep."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        return pid_m, pid_n

    @triton.jit
    def _gate_up_kernel(
        x_ptr,
        w_ptr,
        h_ptr,
        sorted_ptr,
        block_expert_ptr,
        total_ptr,
        num_pairs,
        N,
        K,
        top_k,
        num_blocks,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """h[pair, n] = silu(x[token] . w[e, n]) * (x[token] . w[e, N + n]) over a block of pairs of expert
        e; x [t, K], w [E, 2N, K], h [t*k, N]."""
        pid_m, pid_n = _block_coords(num_blocks, N, BLOCK_N, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        tokens = (pairs // top_k).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * K + ks[None, :]
        g_ptrs = w_ptr + expert * (2 * N * K) + cols[None, :].to(tl.int64) * K + ks[:, None]
        u_ptrs = g_ptrs + N * K
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_g = _dot(a, g, acc_g, IEEE)
            acc_u = _dot(a, u, acc_u, IEEE)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        dt = h_ptr.dtype.element_ty
        gate = _round(acc_g, dt)
        act = _round(gate / (1.0 + tl.exp(-gate)), dt)
        res = _round(act * _round(acc_u, dt), dt)
        dst = h_ptr + pairs[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(dst, res.to(dt), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr,
        w_ptr,
        weights_ptr,
        y_ptr,
        sorted_ptr,
        block_expert_ptr,
        total_ptr,
        num_pairs,
        N,
        K,
        num_blocks,
        EVEN_K: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """y[pair, n] = (h[pair] . w[e, n]) * weight[pair] over a block of pairs of expert e; h [t*k, K],
        w [E, N, K], y [t*k, N]."""
        pid_m, pid_n = _block_coords(num_blocks, N, BLOCK_N, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        rows = pairs.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + rows[:, None] * K + ks[None, :]
        b_ptrs = w_ptr + expert * (N * K) + cols[None, :].to(tl.int64) * K + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, IEEE)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        dt = y_ptr.dtype.element_ty
        wt = _round(tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32), dt)
        res = _round(_round(acc, dt) * wt[:, None], dt)
        dst = y_ptr + rows[:, None] * N + cols[None, :]
        tl.store(dst, res.to(dt), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _sum_kernel(y_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[token] = the sum of its k rows of y in slot order, in float32, rounded once (HF's
        `weighted_out.view(t, k, H).sum(dim=1)`)."""
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < N
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            acc += tl.load(y_ptr + (token * TOP_K + slot) * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + token * N + cols, _round(acc, dt).to(dt), mask=col_ok)
