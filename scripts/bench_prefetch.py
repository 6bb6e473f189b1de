#!/usr/bin/env python3
"""GPU diagnostic: does an L2 prefetch (`kernels/prefetch.py`) issued ahead of a projection make it read its
weights from L2?

Each iteration, captured in a CUDA graph: a side stream issues the prefetch of a weight (gate/up of
Qwen2.5-0.5B, 17.4 MB) while the main stream spins for `--lead-us`, then the main stream multiplies one row
by that weight (cuBLAS). Every iteration uses another copy of the weight (enough copies to overflow L2), so
without the prefetch the product reads HBM. `warm` reuses one copy: the product at L2 speed, the ceiling.
Prints us per iteration; the product's share is the iteration less the spin (`spin only`).

    python scripts/bench_prefetch.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "worker_py")]

from minisgl.kernels import prefetch  # noqa: E402

ROWS, K = 9728, 896
COPIES = 16  # 279 MB of copies: several times any L2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lead-us", type=float, default=20.0, help="how long before the product it is prefetched")
    a = p.parse_args()
    ws = [torch.randn(ROWS, K, device="cuda").bfloat16() for _ in range(COPIES)]
    x = torch.randn(1, K, device="cuda").bfloat16()
    tables = {m: [prefetch.PrefetchTable([w], m) for w in ws] for m in prefetch.MODES}
    side = torch.cuda.Stream()
    # torch.cuda._sleep spins for clock cycles: calibrate it.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(a.lead_us * 1e-3 * 1_000_000 / start.elapsed_time(end))

    def iteration(i: int, mode: str) -> None:
        w = ws[0] if mode == "warm" else ws[i]
        if mode in tables:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch.launch(tables[mode][i])
        torch.cuda._sleep(cycles)
        if mode != "spin only":
            F.linear(x, w)
        if mode in tables:
            torch.cuda.current_stream().wait_stream(side)

    for mode in ("spin only", "cold", *prefetch.MODES, "warm"):
        for i in range(COPIES):
            iteration(i, mode)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(COPIES):
                iteration(i, mode)
        times = []
        for _ in range(20):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / COPIES)
        print(f"{mode:<10} {statistics.median(times):7.2f} us per iteration ({a.lead_us:.0f} us spin)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
