"""Rotary embedding of q and k (neox halves: the two halves of each head rotate together) and the write of
this step's K and V into the paged cache, in one launch where eager torch needs about fourteen. With q/k norm
weights (Qwen3) each q and k head is RMS-normalised first, in the same launch.

`rope_reference` is the eager rotation, rounded as `q * cos + rotate_half(q) * sin` rounds; the kernel rounds
at the same points.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minisgl.kernels import pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

    from minisgl.kernels.pdl import wait_previous
    from minisgl.kernels.rounding import round_to

    # Positions and KV locations are slices of the step's packed buffer at any offset: specialising on their
    # alignment would compile a variant per offset class in the middle of serving.
    @triton.jit(do_not_specialize=["pos_ptr", "loc_ptr", "eps"])
    def _rope_store_kernel(
        qkv_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        loc_ptr,
        q_out_ptr,
        k_cache_ptr,
        v_cache_ptr,
        q_norm_ptr,
        k_norm_ptr,
        eps,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        D: tl.constexpr,
        HEADS: tl.constexpr,
        QK_NORM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        half: tl.constexpr = D // 2
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, half)[None, :]
        row = qkv_ptr + tok * (NQ + 2 * NKV) * D
        # The step's positions and locations (uploaded) and the rotary tables: no kernel writes them, so they
        # are read before the wait.
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        loc = tl.load(loc_ptr + tok).to(tl.int64)
        cos1 = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * D + half + d).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * D + half + d).to(tl.float32)
        wait_previous(PDL)
        dt = q_out_ptr.dtype.element_ty
        # Rows 0..NQ-1 of the tile are q heads, NQ..NQ+NKV-1 k heads: both rotate.
        rot = h < NQ + NKV
        is_q = h < NQ
        x1 = tl.load(row + h * D + d, mask=rot, other=0.0).to(tl.float32)
        x2 = tl.load(row + h * D + half + d, mask=rot, other=0.0).to(tl.float32)
        if QK_NORM:
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
            w1 = tl.where(is_q, tl.load(q_norm_ptr + d), tl.load(k_norm_ptr + d)).to(tl.float32)
            w2 = tl.where(is_q, tl.load(q_norm_ptr + half + d), tl.load(k_norm_ptr + half + d)).to(tl.float32)
            x1 = round_to(round_to(x1 * rstd, dt) * w1, dt)
            x2 = round_to(round_to(x2 * rstd, dt) * w2, dt)
        o1 = (round_to(x1 * cos1, dt) + round_to(-x2 * sin1, dt)).to(dt)
        o2 = (round_to(x2 * cos2, dt) + round_to(x1 * sin2, dt)).to(dt)
        q_dst = q_out_ptr + tok * NQ * D + h * D + d
        tl.store(q_dst, o1, mask=is_q)
        tl.store(q_dst + half, o2, mask=is_q)
        is_k = (h >= NQ) & rot
        k_dst = k_cache_ptr + loc * NKV * D + (h - NQ) * D + d
        tl.store(k_dst, o1, mask=is_k)
        tl.store(k_dst + half, o2, mask=is_k)
        is_v = h < NKV
        v_src = row + (NQ + NKV) * D + h * D + d
        v_dst = v_cache_ptr + loc * NKV * D + h * D + d
        tl.store(v_dst, tl.load(v_src, mask=is_v, other=0.0), mask=is_v)
        tl.store(v_dst + half, tl.load(v_src + half, mask=is_v, other=0.0), mask=is_v)


def rope_reference(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [t, Hq, D], k: [t, Hkv, D], positions: [t]; cos/sin: [max_pos, D]."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeStore(NamedTuple):
    """Where and how a step's q/k/v are rotated and stored (`rope_store_kv`'s arguments after qkv): each
    row's position and KV location, cos/sin [max_pos, D], and K/V of the layer as [locations, Hkv, D] (any
    view whose rows are Hkv * D apart)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    out_loc: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int


def rope_store_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """qkv [t, (Hq + 2 Hkv) * D] contiguous; cos/sin [max_pos, D]; k/v_cache [locations, Hkv, D] (any view
    whose rows are `Hkv * D` apart); `qk_norm` (q weight [D], k weight [D], eps). Writes rotated k and v at
    `out_loc`; returns rotated q [t, Hq, D]."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        heads = triton.next_power_of_2(num_heads + num_kv_heads)
        q_w, k_w, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
        _rope_store_kernel[(t,)](
            qkv,
            positions,
            cos,
            sin,
            out_loc,
            q,
            k_cache,
            v_cache,
            q_w,
            k_w,
            eps,
            num_heads,
            num_kv_heads,
            head_dim,
            heads,
            QK_NORM=qk_norm is not None,
            **pdl.launch_args(qkv),
        )
    return q
