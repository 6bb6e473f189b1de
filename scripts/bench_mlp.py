#!/usr/bin/env python3
"""GPU micro-benchmark of the one-launch MLP (`kernels/mlp.py`) against the launches it replaces, on
Qwen2.5-0.5B's shapes at 1 and 16 rows: the residual add and RMSNorm kernel, gate/up with SiLU and down
through `small_m` (today's decode path), against the norm kernel then one launch for gate/up and down, and one
launch for all three. Each call reads its own copy of the weights (from HBM, as in a decode step), inside a
CUDA graph with PDL as the small decode graphs launch (`bench_kernels.graph_us`). Also times the grid
barrier alone: one launch of one program per SM passing it many times.

    python scripts/bench_mlp.py --out mlp.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py"), str(ROOT / "scripts")]

from bench_kernels import COLD_BYTES, MAX_CALLS, graph_us  # noqa: E402

from minisgl.kernels import grid_barrier, mlp, norm, small_m  # noqa: E402
from minisgl.kernels.rounding import triton  # noqa: E402

HIDDEN, INTER, EPS = 896, 4864, 1e-6
# name -> (tiles, programs per SM)
FUSED = {
    "default": (mlp.Tiles(), 1),
    "gate_up_n16": (mlp.Tiles(gate_up_n=16), 1),
    "down_k512": (mlp.Tiles(down_k=512), 1),
    "warps8": (mlp.Tiles(num_warps=8), 1),
    "two_per_sm": (mlp.Tiles(), 2),
}

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _barriers_kernel(state_ptr, times):
        for _ in range(times):
            grid_barrier.grid_barrier(state_ptr, tl.num_programs(0))


def barrier_us(times: int = 1000) -> float:
    """us per barrier of one program per SM: a launch with `times` barriers against one with none."""
    device = torch.device("cuda")
    programs, state = grid_barrier.max_programs(device), grid_barrier.state(device)

    def launch(n):
        return lambda _i: _barriers_kernel[(programs,)](state, n)

    return (graph_us(launch(times), 4) - graph_us(launch(0), 4)) / times


def bench(rows: int, configs: list[str]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    per_copy = 3 * INTER * HIDDEN * 2
    copies = max(1, min(MAX_CALLS, COLD_BYTES // per_copy))

    def weights(*shape):
        return (torch.randn(*shape, device="cuda", generator=gen) * 0.02).bfloat16()

    gate_up = [weights(2 * INTER, HIDDEN) for _ in range(copies)]
    down = [weights(HIDDEN, INTER) for _ in range(copies)]
    w_norm = (1 + weights(HIDDEN)).bfloat16()
    x, residual = weights(rows, HIDDEN) * 50, weights(rows, HIDDEN) * 50

    def today(i):
        h, _res = norm.add_rms_norm(x, residual, w_norm, EPS)
        return small_m.linear(small_m.linear(h, gate_up[i], silu_mul=True), down[i])

    def norm_then_fused(i, tiles=None, programs=None):
        h, _res = norm.add_rms_norm(x, residual, w_norm, EPS)
        return mlp.mlp(h, None, None, EPS, gate_up[i], down[i], tiles, programs)[0]

    def fused(i, tiles=None, programs=None):
        return mlp.mlp(x, residual, w_norm, EPS, gate_up[i], down[i], tiles, programs)[0]

    want = today(0).float()
    sms = grid_barrier.max_programs(x.device)
    out = {"copies": copies, "today_us": graph_us(today, copies, early=True)}
    for name in configs:
        tiles, per_sm = FUSED[name]
        for kind, fn in (("fused", fused), ("norm_then_fused", norm_then_fused)):
            if kind == "norm_then_fused" and name != "default":
                continue
            try:
                got = fn(0, tiles, sms * per_sm).float()
                err = ((got - want).abs().max() / want.abs().max()).item()
                us = graph_us(lambda i, fn=fn, t=tiles, p=sms * per_sm: fn(i, t, p), copies, early=True)
                out[f"{kind} {name}"] = {"us": us, "rel_err": err}
            except Exception as e:
                out[f"{kind} {name}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_mlp.json")
    p.add_argument("--configs", default=",".join(FUSED))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_mlp.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": torch.cuda.get_device_name()}
    lines = [
        f"# {results['date']} {results['device']}: us per MLP block, CUDA graph, PDL, weights from HBM"
    ]
    try:
        results["barrier_us"] = barrier_us()
        lines.append(f"grid barrier, one program per SM: {results['barrier_us']:.2f} us")
    except Exception:
        results["barrier_error"] = traceback.format_exc()
        lines.append("grid barrier: ERROR")
    print(lines[-1], file=sys.stderr, flush=True)
    for rows in (1, 16):
        r = results[f"m{rows}"] = bench(rows, a.configs.split(","))
        lines.append(f"m{rows:<3} today (norm, gate/up, down){r['today_us']:9.2f} us")
        for key, v in r.items():
            if key in ("copies", "today_us"):
                continue
            text = f"{v['us']:9.2f} us  err {v['rel_err']:.1e}" if "us" in v else v["error"]
            lines.append(f"m{rows:<3} {key:<28}{text}")
        print("\n".join(lines[-len(r) + 1 :]), file=sys.stderr, flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    Path(a.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
