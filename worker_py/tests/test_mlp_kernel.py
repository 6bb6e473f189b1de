"""The one-launch MLP kernel (`kernels/mlp.py`) computes the residual add, RMSNorm, gate/up with SiLU-and-mul
and down as the eager references do. On the CPU under Triton's interpreter, phase by phase (a grid barrier
cannot open there); on a GPU also as one launch with its grid barriers, which must give the phase-by-phase
result bit for bit, replayed from a CUDA graph too."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_check import run_kernel_check

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from minisgl.kernels import grid_barrier, mlp, norm

    device = "{device}"
    torch.manual_seed(0)
    # Shapes that are not multiples of the tiles, so every mask matters: hidden 200, intermediate 72.
    tiles = mlp.Tiles(gate_up_n=16, gate_up_k=64, down_n=16, down_k=32, num_warps=4, num_stages=2)
    # Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot: bf16 is checked compiled only.
    dtypes = ((torch.float32, 1e-5),) if device == "cpu" else ((torch.float32, 5e-3), (torch.bfloat16, 3e-2))
    hidden, inter, eps = 200, 72, 1e-6

    def reference(x, residual, w_norm, gate_up, down):
        if w_norm is None:
            h, res = x, x
        elif residual is None:
            h, res = norm.rms_norm_reference(x, w_norm, eps), x
        else:
            h, res = norm.add_rms_norm_reference(x, residual, w_norm, eps)
        gate, up = F.linear(h.float(), gate_up.float()).to(x.dtype).float().chunk(2, dim=-1)
        act = (F.silu(gate).to(x.dtype).float() * up).to(x.dtype)
        return F.linear(act.float(), down.float()), res

    for dtype, tol in dtypes:
        for m in (1, 5, 16):
            x = torch.randn(m, hidden, device=device).to(dtype)
            residual = torch.randn(m, hidden, device=device).to(dtype)
            w_norm = (1 + torch.randn(hidden, device=device) / 4).to(dtype)
            gate_up = (torch.randn(2 * inter, hidden, device=device) / 10).to(dtype)
            down = (torch.randn(hidden, inter, device=device) / 10).to(dtype)
            for res, wn in ((residual, w_norm), (None, w_norm), (None, None)):
                want, want_res = reference(x, res, wn, gate_up, down)
                runs = [True] if device == "cpu" else [True, False]
                got = [mlp.mlp(x, res, wn, eps, gate_up, down, tiles, phased=p) for p in runs]
                for out, new_res in got:
                    err = ((out.float() - want).abs().max() / want.abs().max()).item()
                    assert out.shape == (m, hidden) and out.dtype == dtype and err < tol, (dtype, m, err)
                    assert torch.equal(new_res, want_res), "the residual sum"
                if len(got) == 2:
                    assert torch.equal(got[0][0], got[1][0]), "one launch differs from the phases"

    if device == "cuda":
        # One launch per SM count and fewer, replayed from a graph: the barrier resets itself every time.
        x, residual = (torch.randn(3, hidden, device=device).bfloat16() for _ in "xr")
        gate_up = (torch.randn(2 * inter, hidden, device=device) / 10).bfloat16()
        down = (torch.randn(hidden, inter, device=device) / 10).bfloat16()
        w_norm = torch.ones(hidden, device=device).bfloat16()
        want = mlp.mlp(x, residual, w_norm, eps, gate_up, down, tiles, phased=True)[0]
        for programs in (grid_barrier.max_programs(x.device), 7):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = mlp.mlp(x, residual, w_norm, eps, gate_up, down, tiles, programs=programs)[0]
            for _ in range(50):
                graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want), programs
        assert not grid_barrier.state(x.device)[0].item(), "arrivals left after the last barrier"
    try:
        mlp.mlp(torch.zeros(17, hidden, device=device), None, None, eps, gate_up, down, tiles, phased=True)
    except ValueError:
        pass
    else:
        raise AssertionError("17 rows accepted")
    print("ok")
    """
)


def run_check(device: str, interpret: bool) -> None:
    run_kernel_check(CHECK.format(device=device), interpret)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test below runs the real kernel")
def test_mlp_kernel_matches_the_references_phase_by_phase_interpreted():
    run_check("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mlp_kernel_in_one_launch_matches_its_phases_on_the_gpu():
    run_check("cuda", interpret=False)
