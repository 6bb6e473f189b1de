"""Fused kernels for the decode path (Triton, CUDA only): one launch where eager torch needs several.

Each kernel rounds exactly where the eager bf16 code rounds (every torch op on bf16 computes in float32 and
rounds its result), so the fused model computes the same numbers as the unfused one, up to the last bit of
an exp() in SiLU:
- `rms_norm` / `add_rms_norm`: HF's RMSNorm (normalise in float32, round, then scale), the second one after
  the residual add (rounded, like `residual + x`), returning the new residual too: 8 to 9 launches become 1.
- `rope_store_kv`: rotary embedding of q and k (neox halves, rounded as `q*cos + rotate_half(q)*sin` rounds)
  and the K/V write into the paged cache at `out_loc`: about 14 launches become 1.
- `silu_and_mul`: `silu(gate) * up` over the merged gate/up projection: 2 launches (and a copy) become 1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the model uses its eager path
    triton = None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def round_to(x, dt: tl.constexpr):
        """x (float32) rounded to the nearest value of `dt` and kept as float32, as a bf16 torch op rounds its
        result before the next op reads it. For bf16 the rounding is done on the bits: a cast down and back
        up may be folded away by the compiler, which would skip the rounding the eager code does."""
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dt).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, eps, n_cols, HAS_RES: tl.constexpr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = round_to(x + r, out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * n_cols + cols, x.to(out_ptr.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = round_to(x * rstd, out_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    # Positions and KV locations are slices of the step's packed buffer at any offset: specialising on their
    # alignment would compile a variant per offset class in the middle of serving.
    @triton.jit(do_not_specialize=["pos_ptr", "loc_ptr"])
    def _rope_store_kernel(
        qkv_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        loc_ptr,
        q_out_ptr,
        k_cache_ptr,
        v_cache_ptr,
        NQ: tl.constexpr,
        NKV: tl.constexpr,
        D: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        half: tl.constexpr = D // 2
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, half)[None, :]
        row = qkv_ptr + tok * (NQ + 2 * NKV) * D
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        loc = tl.load(loc_ptr + tok).to(tl.int64)
        cos1 = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * D + half + d).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * D + half + d).to(tl.float32)
        dt = q_out_ptr.dtype.element_ty
        # Rows 0..NQ-1 of the tile are q heads, NQ..NQ+NKV-1 k heads: both rotate.
        rot = h < NQ + NKV
        x1 = tl.load(row + h * D + d, mask=rot, other=0.0).to(tl.float32)
        x2 = tl.load(row + h * D + half + d, mask=rot, other=0.0).to(tl.float32)
        o1 = (round_to(x1 * cos1, dt) + round_to(-x2 * sin1, dt)).to(dt)
        o2 = (round_to(x2 * cos2, dt) + round_to(x1 * sin2, dt)).to(dt)
        is_q = h < NQ
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

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        s = round_to(g / (1.0 + tl.exp(-g)), dt)
        tl.store(out_ptr + row * n_cols + cols, (s * u).to(dt), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [t, H] contiguous -> RMSNorm(x) [t, H]."""
    out = torch.empty_like(x)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](x, x, x, weight, out, eps, x.shape[1], HAS_RES=False, BLOCK=block)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x); the sum rounded to x's dtype as the eager add rounds it."""
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, new_residual, weight, out, eps, x.shape[1], HAS_RES=True, BLOCK=block
        )
    return out, new_residual


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
) -> torch.Tensor:
    """qkv [t, (Hq + 2 Hkv) * D] contiguous; cos/sin [max_pos, D]; k/v_cache [locations, Hkv, D] (any view
    whose rows are `Hkv * D` apart). Writes rotated k and v at `out_loc`; returns rotated q [t, Hq, D]."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        heads = triton.next_power_of_2(num_heads + num_kv_heads)
        _rope_store_kernel[(t,)](
            qkv, positions, cos, sin, out_loc, q, k_cache, v_cache, num_heads, num_kv_heads, head_dim, heads
        )
    return q


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [t, 2I] contiguous -> silu(gate) * up [t, I]."""
    t, two_i = gate_up.shape
    out = torch.empty(t, two_i // 2, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_and_mul_kernel[(t, triton.cdiv(two_i // 2, block))](gate_up, out, two_i // 2, BLOCK=block)
    return out
