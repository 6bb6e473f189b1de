"""The small-M linear kernel computes what F.linear (+ bias, + SiLU-and-mul, + RoPE and the KV write)
computes. Run by Triton's interpreter on the CPU (in a subprocess: the interpreter is chosen when
kernels are defined), and compiled on a GPU when there is one."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_check import run_kernel_check

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import itertools

    import torch
    import torch.nn.functional as F
    from minisgl.kernels import small_m

    device = "{device}"
    torch.manual_seed(0)
    # Shapes that are not multiples of the tiles, so every mask matters.
    # K of 200 is four 64-column tiles: one program per strip, or four splits whose partial sums the
    # strip's last program adds.
    tiles = (small_m.Tile(16, 64, 4, 2), small_m.Tile(16, 64, 4, 2, split_k=4))
    # Triton 3.9's interpreter multiplies bf16 tiles as raw integers in tl.dot: bf16 is checked compiled only.
    # Compiled, float32 tiles go through TF32 (the model uses the kernel in bf16 and fp16 only).
    dtypes = ((torch.float32, 1e-5),) if device == "cpu" else ((torch.float32, 5e-3), (torch.bfloat16, 2e-2))
    for (dtype, tol), tile in itertools.product(dtypes, tiles):
        for m in (1, 5, 16):
            x = torch.randn(m, 200, device=device).to(dtype)
            w = (torch.randn(40, 200, device=device) / 10).to(dtype)
            b = torch.randn(40, device=device).to(dtype)
            for bias in (None, b):
                got = small_m.linear(x, w, bias, tile=tile)
                want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                assert got.shape == (m, 40) and got.dtype == dtype and err < tol, (dtype, m, err)
            gate, up = F.linear(x.float(), w.float()).to(dtype).float().chunk(2, dim=-1)
            want = F.silu(gate).to(dtype).float() * up
            got = small_m.linear(x, w, silu_mul=True, tile=tile)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert got.shape == (m, 20) and err < tol, ("silu_mul", dtype, m, err)
    from minisgl.kernels import rope

    # qkv_rope: q/k/v with bias, RoPE, q returned and k/v written at their cache locations, against the
    # eager sequence (F.linear, rope_reference, a cache write).
    nq, nkv, d = 3, 1, 32
    pos_table = torch.arange(64, device=device).float()[:, None] * torch.linspace(0.01, 1, d, device=device)
    for (dtype, tol), tile in itertools.product(dtypes, tiles):
        cos, sin = pos_table.cos().to(dtype), pos_table.sin().to(dtype)
        for m in (1, 6, 16):
            h = torch.randn(m, 200, device=device).to(dtype)
            w = (torch.randn((nq + 2 * nkv) * d, 200, device=device) / 10).to(dtype)
            b = torch.randn((nq + 2 * nkv) * d, device=device).to(dtype)
            positions = torch.randint(0, 64, (m,), device=device)
            loc = torch.randperm(100, device=device)[:m]
            k_cache = torch.zeros(100, nkv, d, device=device, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            spec = rope.RopeStore(positions, cos, sin, loc, k_cache, v_cache, nq, nkv, d)
            q = small_m.qkv_rope(h, w, b, spec, tile=tile)
            qkv = F.linear(h.float(), w.float(), b.float())
            wq, wk, wv = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
            wq, wk = rope.rope_reference(
                positions, wq.reshape(m, nq, d), wk.reshape(m, nkv, d), cos.float(), sin.float()
            )
            for got, want in ((q, wq), (k_cache[loc], wk), (v_cache[loc], wv.reshape(m, nkv, d))):
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                assert err < tol, ("rope", dtype, m, tile.split_k, err)
            others = torch.ones(100, dtype=torch.bool, device=device)
            others[loc] = False
            assert not k_cache[others].any() and not v_cache[others].any(), "rope wrote outside out_loc"
    # A column block past the end of the weight and the default tile.
    x = torch.randn(3, 96, device=device)
    w = torch.randn(7, 96, device=device)
    assert torch.allclose(small_m.linear(x, w), F.linear(x, w), atol=1e-4 if device == "cpu" else 5e-2)
    try:
        small_m.linear(torch.zeros(17, 96, device=device), w)
    except ValueError:
        pass
    else:
        raise AssertionError("17 rows accepted")
    # Every strip's arrival counter is back at zero for the next launch.
    (counters,) = small_m._COUNTERS.values()
    assert not counters.any()
    print("ok")
    """
)


def run_check(device: str, interpret: bool) -> None:
    run_kernel_check(CHECK.format(device=device), interpret)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernel")
def test_small_m_linear_matches_f_linear_interpreted():
    run_check("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_small_m_linear_matches_f_linear_on_the_gpu():
    run_check("cuda", interpret=False)
