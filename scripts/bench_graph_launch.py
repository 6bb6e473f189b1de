#!/usr/bin/env python3
"""GPU micro-benchmark: the host time of replaying a CUDA graph, by the number of kernels in it.

A decode step at batch 1 replays a graph of about 210 kernels (and a small sampling graph), and its host path
in `launch()` measured 0.19 to 0.23 ms on an H100 against issue 12's 0.15 ms. This says how much of that the
replay itself takes, and whether it grows with the kernels in the graph and with programmatic dependent launch
(`kernels/pdl.py`): graphs of N launches of one small Triton kernel, captured plain and launched early, each
replayed alone (the device idle) and back to back (the device busy: the queue may push back).

    python scripts/bench_graph_launch.py --kernels 1,16,64,256 --out graph_launch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py")]

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minisgl.kernels import pdl  # noqa: E402


@triton.jit
def _bump(x_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


def bump(x: torch.Tensor) -> None:
    _bump[(triton.cdiv(x.numel(), 1024),)](x, x.numel(), BLOCK=1024, **pdl.launch_args(x))


def capture(kernels: int, early: bool, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    bump(x)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pdl.launched_early(early), torch.cuda.graph(graph):
        for _ in range(kernels):
            bump(x)
    return graph


def host_us(graph: torch.cuda.CUDAGraph, reps: int, idle: bool) -> float:
    """Median host microseconds of `graph.replay()`."""
    times = []
    for _ in range(reps):
        if idle:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times[reps // 10 :])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="1,16,64,256", help="kernels per graph")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    a = p.parse_args()
    x = torch.zeros(896, device="cuda")
    rows = []
    print(
        f"{'kernels':>8} {'PDL':>5} {'idle: host us':>14} {'busy: host us':>14}  (median of {a.reps} replays)"
    )
    for kernels in (int(k) for k in a.kernels.split(",")):
        for early in (False, True):
            graph = capture(kernels, early, x)
            host_us(graph, 20, idle=True)  # the first replays upload the graph
            row = {
                "kernels": kernels,
                "pdl": early,
                "idle_host_us": host_us(graph, a.reps, idle=True),
                "busy_host_us": host_us(graph, a.reps, idle=False),
            }
            rows.append(row)
            print(f"{kernels:>8} {str(early):>5} {row['idle_host_us']:>14.1f} {row['busy_host_us']:>14.1f}")
    if a.out:
        report = {
            "device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        a.out.write_text(json.dumps(report | {"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
