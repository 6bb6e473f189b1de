#!/usr/bin/env python3
"""GPU micro-benchmark of `small_m` against cuBLAS on Qwen2.5-0.5B's decode projections.

For each weight shape (q/k/v with its bias, alone and with RoPE; o; gate/up with SiLU-and-mul; down; the tied
lm_head) and batch rows 1 and 16, times every tile of a sweep and the path the model takes without small_m
(F.linear, then `rope.rope_store_kv` or `activation.silu_and_mul`), each call replayed inside a CUDA graph as
the decode step runs it. Every call reads a different copy of the weights, enough copies to overflow the L2
cache: in a decode step every layer's weights come from HBM (a first version of this script reused one copy,
measured L2 speeds, and picked tiles that lost in the model). `--warm` measures exactly that on purpose: every
call reads one copy, from L2, which says how much of a call's time is reading HBM and how much is the kernel's
own (docs/benchmarks.md, 2026-12-06 on the H200). `--pdl` launches our kernels early, as the small graphs do;
a graph of one kernel after copies of itself then flatters whatever overlaps the kernel before (tiles that
read their weights before the wait won 1 us a call here and lost in the model, 2026-12-07): decide with
`scripts/bench_gpu.py`. Prints a table and the best tile per shape in the form of `small_m.TILES`.

    python scripts/bench_kernels.py --out kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py")]

from minisgl.kernels import activation, pdl, rope, small_m  # noqa: E402

HIDDEN, INTER, QKV, VOCAB = 896, 4864, 1152, 151936
HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
L, SILU, ROPE = small_m.LINEAR, small_m.SILU, small_m.ROPE
# name -> (output columns, input columns, bias, what the launch computes around the product: small_m's op)
SHAPES = {
    "qkv_bias": (QKV, HIDDEN, True, L),  # after the norm kernel
    "qkv_bias_rope": (QKV, HIDDEN, True, ROPE),  # after the norm kernel, with RoPE and the KV write
    "o": (HIDDEN, HIDDEN, False, L),
    "gate_up_silu": (INTER, HIDDEN, False, SILU),  # SiLU-and-mul fused
    "down": (HIDDEN, INTER, False, L),
    "lm_head": (VOCAB, HIDDEN, False, L),
}
ROWS = (1, 16)
COLD_BYTES = 256 << 20  # weight copies per graph: five times the H200's 50 MB L2
MAX_CALLS = 64


def tiles(name: str) -> list[small_m.Tile]:
    """The sweep for a shape: column strips, K tiles, pipeline depth, and K splits where K is long or the
    strips are few (each split is another program streaming its share of W)."""
    if SHAPES[name][3] == ROPE:  # a strip is a head: only K is tiled
        sweep = itertools.product((128, 256), (4,), (3,), (1, 2, 4))
        return [small_m.Tile(HEAD_DIM // 2, *t) for t in sweep]
    if name == "lm_head":
        lm_head = ((64, 128, 4, 3), (32, 128, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3))
        return [small_m.Tile(*t) for t in lm_head]
    strips = (16, 32, 64) if name == "down" else (16, 32)
    splits = {"down": (2, 4, 8), "o": (1, 2, 4), "qkv_bias": (1, 2)}.get(name, (1,))
    sweep = itertools.product(strips, (128, 256), (4,), (3,), splits)
    return [small_m.Tile(*t) for t in sweep] + [small_m.Tile(16, 256, 2, 4, s) for s in splits]


def graph_us(fn, copies: int, early: bool = False) -> float:
    """Median time of one `fn(i)` call, i = 0..copies-1 (each on its own weight copy) captured in a CUDA
    graph and replayed; with `early` our kernels are launched with PDL (kernels/pdl.py), as in the model's
    small graphs."""
    with pdl.launched_early(early):  # the warm-up compiles the variant the graph launches
        fn(0)
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn(0)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                fn(i)
    graph.replay()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def bench_shape(name: str, rows: int, warm: bool, early: bool) -> dict:
    n, k, has_bias, op = SHAPES[name]
    silu = op == SILU
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_rows = 2 * n if silu else n
    copies = 1 if warm else max(1, min(MAX_CALLS, COLD_BYTES // (w_rows * k * 2)))
    ws = [(torch.randn(w_rows, k, device="cuda", generator=gen) * 0.02).bfloat16() for _ in range(copies)]
    if warm:  # as many calls per graph as cold, on the one copy: a graph of one call times its launch
        ws *= MAX_CALLS
    b = torch.randn(n, device="cuda", generator=gen).bfloat16() if has_bias else None
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()

    rope_spec = None
    if op == ROPE:  # a decode step's rows at positions up to 1,000, into a cache of 4,096 slots
        angles = torch.arange(1024, device="cuda").float()[:, None] * torch.rand(HEAD_DIM, device="cuda")
        k_cache, v_cache = (torch.zeros(4096, KV_HEADS, HEAD_DIM, device="cuda").bfloat16() for _ in "kv")
        positions = torch.randint(0, 1000, (rows,), device="cuda", generator=gen)
        loc = torch.randperm(4096, device="cuda", generator=gen)[:rows]
        cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        rope_spec = rope.RopeStore(positions, cos, sin, loc, k_cache, v_cache, HEADS, KV_HEADS, HEAD_DIM)

    def current(i):
        out = F.linear(x, ws[i], b)
        if op == ROPE:
            r = rope_spec
            return rope.rope_store_kv(
                out, r.positions, r.cos, r.sin, r.out_loc, r.k_cache, r.v_cache, HEADS, KV_HEADS, HEAD_DIM
            )
        return activation.silu_and_mul(out) if silu else out

    def ours(i, t):
        if op == ROPE:
            return small_m.qkv_rope(x, ws[i], b, rope_spec, tile=t)
        return small_m.linear(x, ws[i], b, silu_mul=silu, tile=t)

    want = current(0).float()
    weight_bytes = ws[0].numel() * 2
    row = {"copies": copies, "cublas_us": graph_us(current, len(ws), early), "tiles": {}}
    for t in tiles(name):
        try:
            got = ours(0, t).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            us = graph_us(lambda i, t=t: ours(i, t), len(ws), early)
            row["tiles"][",".join(map(str, t))] = {"us": us, "rel_err": err}
        except Exception as e:  # a tile that does not compile (shared memory): skip it, say so
            row["tiles"][",".join(map(str, t))] = {"error": f"{type(e).__name__}: {e}"[:200]}
    ok = {key: r for key, r in row["tiles"].items() if "us" in r and r["rel_err"] < 2e-2}
    best = min(ok, key=lambda key: ok[key]["us"]) if ok else None
    row["best"] = best
    row["best_us"] = ok[best]["us"] if best else None
    row["cublas_gbps"] = weight_bytes / row["cublas_us"] / 1e3
    row["best_gbps"] = weight_bytes / row["best_us"] / 1e3 if best else None
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_kernels.json")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--warm", action="store_true", help="every call reads the same weights, from L2")
    p.add_argument("--pdl", action="store_true", help="our kernels launched with PDL, as in small graphs")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(),
        "weights": "L2" if a.warm else "HBM",
        "pdl": a.pdl,
    }
    lines = [
        f"# {results['date']} {results['device']}: us per call inside a CUDA graph, weights from "
        f"{'L2' if a.warm else 'HBM'} (GB/s){', PDL launches' if a.pdl else ''}; "
        "cublas = the path without small_m (cuBLAS, then the RoPE or SiLU kernel)"
    ]
    suggested = {}
    t0 = time.perf_counter()
    for name in a.shapes.split(","):
        for rows in ROWS:
            try:
                r = bench_shape(name, rows, a.warm, a.pdl)
            except Exception:
                r = {"error": traceback.format_exc()}
                print(r["error"], file=sys.stderr)
            results[f"{name} m{rows}"] = r
            if "error" in r:
                lines.append(f"{name:<8} m{rows:<3} ERROR")
                continue
            lines.append(
                f"{name:<8} m{rows:<3} cublas {r['cublas_us']:7.2f} us ({r['cublas_gbps']:5.0f})   small_m "
                f"{r['best_us'] or float('nan'):7.2f} us ({r['best_gbps'] or 0:5.0f})  tile {r['best']}"
            )
            print(lines[-1], f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        # The tile for the shape: the best at 16 rows among those within 5% of the best at one row.
        one, sixteen = results.get(f"{name} m1", {}), results.get(f"{name} m16", {})
        if "tiles" in one and "tiles" in sixteen and one["best"]:
            n, k, _, op = SHAPES[name]
            near = [
                key
                for key, r in one["tiles"].items()
                if "us" in r and r["us"] <= 1.05 * one["best_us"] and "us" in sixteen["tiles"].get(key, {})
            ]
            key = min(near, key=lambda key: sixteen["tiles"][key]["us"])
            # Only where it beats the path without small_m at both batch sizes.
            if all(r["tiles"][key]["us"] < r["cublas_us"] for r in (one, sixteen)):
                rows_w = 2 * n if op == SILU else n
                suggested[f"({rows_w}, {k}, {op!r})"] = f"Tile({key})"
    results["suggested_tiles"] = suggested
    lines.append("suggested TILES: " + ", ".join(f"{k}: {v}" for k, v in suggested.items()))
    Path(a.out).write_text(json.dumps(results, indent=1))
    Path(a.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
