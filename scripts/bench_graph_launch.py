#!/usr/bin/env python3
"""GPU micro-benchmark: the host time of replaying a CUDA graph, by the number of kernels in it.

A decode step at batch 1 replays a graph of about 210 kernels (and a small sampling graph), and its host path
in `launch()` measured 0.19 to 0.23 ms on an H100 against issue 12's 0.15 ms. This says how much of that the
replay itself takes, and whether it grows with the kernels in the graph and with programmatic dependent launch
(`kernels/pdl.py`): graphs of N launches of one small Triton kernel, captured plain and launched early, each
replayed alone (the device idle) and back to back (the device busy: the queue may push back).

    python scripts/bench_graph_launch.py --kernels 1,16,64,256 --out graph_launch.json
    python scripts/bench_graph_launch.py --model      # and every graph the runner captures for the model

Measured on an H100 (docs/benchmarks.md, 2026-12-07) a graph of 256 of these kernels replays in 3 us, while
cProfile put the decode graph's replay at ~47 us: `--mm` puts a cuBLAS GEMV beside each kernel, and `--model`
times the replays of the runner's own graphs (Qwen2.5-0.5B shapes, random weights), to find which of their
nodes makes a replay slow.
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


def capture(kernels: int, early: bool, x: torch.Tensor, w: torch.Tensor | None) -> torch.cuda.CUDAGraph:
    """A graph of `kernels` bumps of x, each followed by a cuBLAS GEMV of x by w when w is given."""

    def run() -> None:
        for _ in range(kernels):
            bump(x)
            if w is not None:
                torch.mm(x.view(1, -1).to(w.dtype), w)

    run()  # compiled (and cuBLAS set up) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pdl.launched_early(early), torch.cuda.graph(graph):
        run()
    return graph


def host_us(graph: torch.cuda.CUDAGraph, reps: int, idle: bool, after=None) -> float:
    """Median host microseconds of `graph.replay()`; with `after`, each replay follows one of that graph,
    untimed (a decode step replays its forward graph, then its sampling graph)."""
    times = []
    for _ in range(reps):
        if idle:
            torch.cuda.synchronize()
        if after is not None:
            after.replay()
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
    p.add_argument("--mm", action="store_true", help="a cuBLAS GEMV after each kernel too")
    p.add_argument("--model", action="store_true", help="also time the runner's own graphs")
    a = p.parse_args()
    x = torch.zeros(896, device="cuda")
    w = torch.zeros(896, 896, device="cuda", dtype=torch.bfloat16) if a.mm else None
    rows = []
    print(
        f"{'kernels':>8} {'PDL':>5} {'idle: host us':>14} {'busy: host us':>14}  (median of {a.reps} replays)"
    )
    for kernels in (int(k) for k in a.kernels.split(",")):
        for early in (False, True):
            graph = capture(kernels, early, x, w)
            host_us(graph, 20, idle=True)  # the first replays upload the graph
            row = {
                "kernels": kernels,
                "pdl": early,
                "mm": a.mm,
                "idle_host_us": host_us(graph, a.reps, idle=True),
                "busy_host_us": host_us(graph, a.reps, idle=False),
            }
            rows.append(row)
            print(f"{kernels:>8} {str(early):>5} {row['idle_host_us']:>14.1f} {row['busy_host_us']:>14.1f}")
    if a.model:
        rows += model_graphs(a.reps)
    if a.out:
        report = {
            "device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        a.out.write_text(json.dumps(report | {"rows": rows}, indent=1) + "\n")
    return 0


def model_graphs(reps: int) -> list[dict]:
    """The host time of replaying each graph a ModelRunner captures, on the empty step it was captured from
    (all padding)."""
    import tempfile

    from minisgl.bench.random_model import make_model
    from minisgl.worker.config import WorkerConfig
    from minisgl.worker.cuda_graph import _empty_decode_step
    from minisgl.worker.runner import ModelRunner

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp), seed=0, init_std=0.02)
        config = WorkerConfig(model=str(model), device="cuda", dtype="bfloat16", num_pages=4096, page_size=16,
                              max_batch=256, max_step_tokens=2048, extend_graph_tokens=2048)  # fmt: skip
        runner = ModelRunner(config, show_progress=False)
        graphs = runner.graphs
        captured = graphs.captured()
        print(f"{'graph':>24} {'idle: host us':>14} {'busy: host us':>14} {'after the other':>16}")
        for (kind, size, mode), graph in sorted(captured.items(), key=lambda kv: str(kv[0])):
            with torch.inference_mode():
                runner.uploader.upload(_empty_decode_step(), graphs.padding_of(kind, size))
                runner.uploader.finish()
            # A decode step's pair: its forward graph and a sampling graph of its size (same padding).
            other = None
            if kind == "sampling":
                other = captured[("decode", size, None)]
            elif kind == "decode":
                pairs = (g for (k, rows, _), g in captured.items() if k == "sampling" and rows == size)
                other = next(pairs, None)
            host_us(graph, 5, idle=True)
            row = {
                "graph": f"{kind} {size}" + (f" {mode.name}" if mode is not None else ""),
                "idle_host_us": host_us(graph, reps // 4, idle=True),
                "busy_host_us": host_us(graph, reps // 4, idle=False),
                "after_other_us": host_us(graph, reps // 4, idle=True, after=other) if other else None,
            }
            rows.append(row)
            after = f"{row['after_other_us']:>16.1f}" if other else f"{'':>16}"
            print(f"{row['graph']:>24} {row['idle_host_us']:>14.1f} {row['busy_host_us']:>14.1f} {after}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
