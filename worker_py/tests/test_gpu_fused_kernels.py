"""The Triton kernels against the eager bf16 code they replace. On CUDA; or on the CPU through Triton's
interpreter (`TRITON_INTERPRET=1` with triton installed). Skipped otherwise."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from minisgl.kernels import activation, norm, rope  # noqa: E402
from minisgl.layers.rotary import RopeScaling, RotaryEmbedding  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 for the CPU", allow_module_level=True)

BF16 = torch.bfloat16


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16).to(DEVICE)


# The interpreter truncates float32 to bf16 where the GPU rounds to nearest, so on the CPU only the indexing
# is checked exactly and the values to within a few bf16 steps; on the GPU the rounding must match too.
INTERPRETED = DEVICE == "cpu"


def assert_nearly_equal(got, want, exact_fraction=0.97):
    """Equal to within one bf16 step everywhere, and bit-equal almost everywhere (an exp() or a sum in
    another order may round differently in float32 and, rarely, cross a bf16 rounding boundary)."""
    if INTERPRETED:
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-5, atol=0.05)
        return
    torch.testing.assert_close(
        got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.float().abs().max().item()
    )
    assert (got == want).float().mean().item() >= exact_fraction


@pytest.mark.parametrize("rows", [1, 5, 33])
def test_rms_norm_and_add_rms_norm(rows):
    weight, eps = rand(896, scale=0.3, seed=1) + 1, 1e-6
    x, r = rand(rows, 896, scale=3, seed=2), rand(rows, 896, scale=20, seed=3)
    assert_nearly_equal(norm.rms_norm(x, weight, eps), norm.rms_norm_reference(x, weight, eps))
    out, new_r = norm.add_rms_norm(x, r, weight, eps)
    want, want_r = norm.add_rms_norm_reference(x, r, weight, eps)
    assert_nearly_equal(new_r, want_r, exact_fraction=1.0)
    assert_nearly_equal(out, want)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_rope_store_kv_matches_rotary_and_the_cache_write(qk_norm):
    hq, hkv, d, t = 14, 2, 64, 9
    rotary = RotaryEmbedding(d, 4096, 1e6, RopeScaling(), BF16, DEVICE)
    qkv = rand(t, (hq + 2 * hkv) * d, scale=2, seed=4)
    norms = (rand(d, scale=0.3, seed=7) + 1, rand(d, scale=0.3, seed=8) + 1, 1e-6) if qk_norm else None
    positions = torch.tensor([0, 1, 2, 17, 300, 4095, 5, 6, 7], dtype=torch.int32, device=DEVICE)
    out_loc = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:t].int().to(DEVICE)
    k_cache = torch.full((64, hkv, d), float("nan"), dtype=BF16, device=DEVICE)
    v_cache = k_cache.clone()

    # Through RopeStore, as the attention layer calls it: its fields are the kernel's arguments, in order.
    store = rope.RopeStore(positions, rotary.cos, rotary.sin, out_loc, k_cache, v_cache, hq, hkv, d)
    q = rope.rope_store_kv(qkv, *store, norms)

    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q_ref, k_ref = q_ref.reshape(t, hq, d), k_ref.reshape(t, hkv, d)
    if qk_norm:
        q_ref = norm.rms_norm_reference(q_ref, norms[0], norms[2])
        k_ref = norm.rms_norm_reference(k_ref, norms[1], norms[2])
    q_ref, k_ref = rope.rope_reference(positions, q_ref, k_ref, rotary.cos, rotary.sin)
    # A q/k norm sums over the head in another order than torch: a rare bf16 boundary may round apart.
    exact = 0.99 if qk_norm else 1.0
    assert_nearly_equal(q, q_ref, exact_fraction=exact)
    loc = out_loc.long()
    assert_nearly_equal(k_cache[loc], k_ref, exact_fraction=exact)
    assert torch.equal(v_cache[loc], v_ref.reshape(t, hkv, d))
    untouched = torch.ones(64, dtype=torch.bool, device=DEVICE)
    untouched[loc] = False
    assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()


@pytest.mark.parametrize("rows", [1, 7])
def test_silu_and_mul(rows):
    gate_up = rand(rows, 2 * 4864, scale=4, seed=6)
    gate, up = gate_up.chunk(2, dim=-1)
    assert_nearly_equal(activation.silu_and_mul(gate_up), F.silu(gate) * up)
