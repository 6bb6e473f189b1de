#!/usr/bin/env python3
"""GPU benchmark of `minisgl.kernels.moe.fused_moe` against its torch reference (`moe_reference`).

Shapes: Qwen3-30B-A3B's experts (E=128, k=8, H=2048, I=768) and two small ones, at t = 1, 16, 256, 2048
tokens. For each it times
- `ref`: moe_reference, eager (it syncs with the host once per call, so it cannot be graphed);
- `fused`: fused_moe, eager (every launch paid from Python);
- `graph`: fused_moe replayed in a CUDA graph, as a decode step runs it;
and prints a table with the graph's speedup over the reference, the bandwidth on the weights of the experts
the routing hits (the bound at decode sizes) and the arithmetic rate (the bound at prefill sizes), plus the
largest difference from the reference.

Every call reads another copy of the experts (another "layer"), enough copies to overflow the H200's L2,
and a routing of its own, as consecutive layers of a model do; the time is per call.

    python scripts/bench_moe.py                  # the table with tile_for's tiles
    python scripts/bench_moe.py --sweep          # also times a sweep of tiles per point, and the best
    python scripts/bench_moe.py --out moe.json   # the rows as JSON too
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py")]

from minisgl.kernels import moe  # noqa: E402

# name -> (E, k, H, I)
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "e64-k8": (64, 8, 1024, 256),
    "e8-k2": (8, 2, 1024, 512),
}
TOKENS = (1, 16, 256, 2048)
COLD_BYTES = 256 << 20  # weight bytes cycled through per timing: five times the H200's 50 MB L2
MAX_COPIES = 16
REPEATS = 5


def sweep_tiles() -> list[moe.MoeTile]:
    out = []
    for bm, bn, bk, warps, stages in [
        (16, 64, 128, 4, 4),
        (16, 64, 256, 4, 3),
        (16, 128, 128, 4, 3),
        (16, 32, 256, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 3),
        (64, 128, 64, 8, 4),
        (64, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (128, 128, 32, 4, 4),
    ]:
        for group_m in (1, 8):
            out.append(moe.MoeTile(bm, bn, bk, group_m, warps, stages))
    return out


def make_layers(num_experts, k, hidden, inter, t, copies, device="cuda"):
    dt = torch.bfloat16
    layers = []
    for _ in range(copies):
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dt)
        w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).to(dt)
        weights, ids = moe.route(torch.randn(t, num_experts, device=device), k, renormalize=True)
        layers.append((w13, w2, weights, ids))
    x = torch.randn(t, hidden, device=device).to(dt)
    return x, layers


def events_us(fn, calls: int) -> float:
    """Median over REPEATS of the time of `calls` calls of fn(i), per call."""
    fn(0)
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def graph_us(fn, calls: int) -> float:
    """fn(0..calls-1) captured in one CUDA graph and replayed; the median time per call."""
    fn(0)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # warm the allocator's pool for the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    return events_us(lambda i: graph.replay(), 1) / calls


def hit_bytes(layers, inter, hidden) -> float:
    """Mean bytes of expert weights a call reads: every expert its routing hits, w13 and w2, once."""
    per_expert = 3 * inter * hidden * 2
    return statistics.mean(len(torch.unique(ids)) * per_expert for _, _, _, ids in layers)


def bench_point(name, shape, t, sweep):
    num_experts, k, hidden, inter = shape
    layer_bytes = 3 * num_experts * inter * hidden * 2
    copies = max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / layer_bytes)))
    x, layers = make_layers(num_experts, k, hidden, inter, t, copies)

    def ref(i):
        w13, w2, weights, ids = layers[i % copies]
        return moe.moe_reference(x, w13, w2, weights, ids)

    def fused(i, tile=None):
        w13, w2, weights, ids = layers[i % copies]
        return moe.fused_moe(x, w13, w2, weights, ids, tile=tile)

    diff = max((fused(i).float() - ref(i).float()).abs().max().item() for i in range(copies))
    row = {
        "shape": name,
        "E": num_experts,
        "k": k,
        "H": hidden,
        "I": inter,
        "t": t,
        "tile": list(moe.tile_for(t, k, num_experts, inter)),
        "ref_us": events_us(ref, copies),
        "fused_us": events_us(fused, copies),
        "graph_us": graph_us(fused, copies),
        "max_abs_diff": diff,
    }
    row["hit_gb"] = hit_bytes(layers, inter, hidden) / 1e9
    row["flop"] = 2 * t * k * 3 * hidden * inter
    if sweep:
        timings = []
        for tile in sweep_tiles():
            try:
                timings.append((graph_us(lambda i, tile=tile: fused(i, tile), copies), tile))
            except Exception as e:  # a tile the GPU cannot run (shared memory, registers)
                print(f"  {name} t={t} {tuple(tile)}: {type(e).__name__}", file=sys.stderr)
        timings.sort()
        row["sweep"] = [(us, list(tile)) for us, tile in timings]
    return row


def print_table(rows) -> None:
    head = (
        f"{'shape':<14} {'t':>5} {'tile (bm,bn,bk,g,w,s)':<24} {'ref us':>9} {'fused us':>9} "
        f"{'graph us':>9} {'x ref':>6} {'GB/s':>6} {'TFLOP/s':>7} {'max diff':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        tile = ",".join(str(v) for v in r["tile"])
        print(
            f"{r['shape']:<14} {r['t']:>5} {tile:<24} {r['ref_us']:>9.1f} {r['fused_us']:>9.1f} "
            f"{r['graph_us']:>9.1f} {r['ref_us'] / r['graph_us']:>6.1f} "
            f"{r['hit_gb'] / (r['graph_us'] * 1e-6):>6.0f} {r['flop'] / (r['graph_us'] * 1e-6) / 1e12:>7.1f} "
            f"{r['max_abs_diff']:>9.2e}"
        )
    swept = [r for r in rows if r.get("sweep")]
    if swept:
        print("\nsweep (graph us; best three tiles, and tile_for's):")
        for r in swept:
            best = "  ".join(f"{','.join(map(str, tile))}: {us:.1f}" for us, tile in r["sweep"][:3])
            print(f"{r['shape']:<14} {r['t']:>5}  {best}   [tile_for {r['graph_us']:.1f}]")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of tiles at every point")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and moe.available("cuda")):
        sys.exit("bench_moe needs a CUDA GPU and triton")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {moe.triton.__version__}")
    rows = []
    for name in args.shapes:
        for t in args.tokens:
            rows.append(bench_point(name, SHAPES[name], t, args.sweep))
            r = rows[-1]
            print(f"  {name} t={t}: ref {r['ref_us']:.1f} us, graph {r['graph_us']:.1f} us", file=sys.stderr)
            torch.cuda.empty_cache()
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
