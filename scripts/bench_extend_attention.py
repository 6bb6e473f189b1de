#!/usr/bin/env python3
"""GPU benchmark of extend (prefill) attention alone: minisgl's Triton kernel (kernels/extend_attention.py),
which a CUDA graph can hold, against FlashInfer 0.5.3's paged prefill (planned on the host every step, so
eager only), on Qwen2.5-0.5B's shapes (Hq 14, Hkv 2, D 64, bf16, page size 16).

Cases: prompts from scratch, a chunk after a long cached prefix, several prompts, and a mixed step (prompts
beside one-token decodes). GPU time per call as bench_attention.py takes it (median of the replays, L2
flushed before each call: "cold"), ours replayed from a graph, FlashInfer's run() eagerly after one plan;
FlashInfer's host time for plan() + run() too. Each result is checked against the other (max abs error).

    python scripts/bench_extend_attention.py --out extend_attention.json
    python scripts/bench_extend_attention.py --variants "rows64:tile_rows=64;warps8:num_warps=8"

`--variants` times our kernel with other launch options too, one column each (NAME:OPTION=VALUE,...; the
options are `extend_attention`'s keyword arguments: tile_rows, block_n, num_warps, num_stages).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py"), str(ROOT / "scripts")]

from bench_attention import DTYPE, HKV, HQ, PAGE, D, Timer, graph_of  # noqa: E402

from minisgl.kernels import extend_attention as te  # noqa: E402

# (cached prefix, new tokens) per request.
CASES = {
    "1 x 512": [(0, 512)],
    "1 x 2048": [(0, 2048)],
    "1 x 8192": [(0, 8192)],
    "4 x 512": [(0, 512)] * 4,
    "512 after 4096 cached": [(4096, 512)],
    "2 x 1024 + 64 decodes of 1000": [(0, 1024)] * 2 + [(1000, 1)] * 64,
}


def make_step(reqs: list[tuple[int, int]], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lens = [p + t for p, t in reqs]
    pages = [math.ceil(n / PAGE) for n in lens]
    total = sum(pages)
    pool = torch.randperm(total + 16, generator=g)[:total]
    k = torch.randn(total + 16, PAGE, HKV, D, generator=g).to(DTYPE)
    t = sum(new for _, new in reqs)
    host = {
        "qo_indptr": torch.tensor([0] + [new for _, new in reqs]).cumsum(0).to(torch.int32),
        "kv_indptr": torch.tensor([0, *pages]).cumsum(0).to(torch.int32),
        "seq_len": torch.tensor(lens, dtype=torch.int32),
    }
    host["last_page_len"] = host["seq_len"] - (torch.tensor(pages, dtype=torch.int32) - 1) * PAGE
    dev = {name: x.cuda() for name, x in host.items()}
    return {
        "q": torch.randn(t, HQ, D, generator=g).to(DTYPE).cuda(),
        "k": k.cuda(),
        "v": torch.randn_like(k).cuda(),
        "indices": pool.to(torch.int32).cuda(),
        "host": host,
        "dev": dev,
    }


def ours(s: dict, out: torch.Tensor, **options):
    d = s["dev"]
    return lambda: te.extend_attention(
        s["q"], s["k"], s["v"], d["qo_indptr"], d["kv_indptr"], s["indices"], d["seq_len"], out=out, **options
    )


def parse_variants(spec: str) -> dict[str, dict[str, int]]:
    """--variants "a:tile_rows=64;b:num_warps=8,num_stages=3" as {"a": {"tile_rows": 64}, "b": {...}}."""
    variants = {}
    for part in filter(None, spec.split(";")):
        name, _, options = part.partition(":")
        variants[name] = {k: int(v) for k, v in (o.split("=") for o in options.split(",") if o)}
    return variants


def graph_us(timer: Timer, s: dict, **options) -> tuple[float, torch.Tensor]:
    """Our kernel's GPU time replayed from a graph, and its output."""
    out = torch.empty_like(s["q"])
    call = ours(s, out, **options)
    call()  # compiles outside the capture
    graph = graph_of(call)
    us = statistics.median(timer.gpu_us(graph.replay, cold=True))
    graph.replay()
    return us, out


def flashinfer_prefill(s: dict):
    import flashinfer

    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    h = s["host"]

    def plan() -> None:
        wrapper.plan(
            h["qo_indptr"], h["kv_indptr"], s["indices"], h["last_page_len"], HQ, HKV, D, PAGE, causal=True,
            q_data_type=DTYPE, kv_data_type=DTYPE,
        )  # fmt: skip

    plan()
    return plan, lambda: wrapper.run(s["q"], (s["k"], s["v"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--variants", default="", help="more columns: NAME:OPTION=VALUE,...;NAME:...")
    a = p.parse_args()
    variants = parse_variants(a.variants)
    timer = Timer()
    rows = []
    extra = "".join(f" {name + ' us':>12}" for name in variants)
    head = f"{'case':<32} {'ours, graph us':>15} {'FlashInfer us':>14} {'FI host us':>11} {'max diff':>9}"
    print(head + extra)
    for i, (name, reqs) in enumerate(CASES.items()):
        s = make_step(reqs, seed=i)
        mine, out = graph_us(timer, s)
        plan, run = flashinfer_prefill(s)
        want = run()
        theirs = statistics.median(timer.gpu_us(run, cold=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            plan()
            run()
        host = (time.perf_counter() - t0) / 20 * 1e6
        diff = (out.float() - want.float()).abs().max().item()
        row = {"case": name, "ours_graph_us": mine, "flashinfer_us": theirs, "flashinfer_host_us": host,
               "max_diff": diff}  # fmt: skip
        for variant, options in variants.items():
            us, got = graph_us(timer, s, **options)
            row[variant] = {"us": us, "max_diff": (got.float() - want.float()).abs().max().item()}
        rows.append(row)
        cols = "".join(f" {row[v]['us']:>12.1f}" for v in variants)
        print(f"{name:<32} {mine:>15.1f} {theirs:>14.1f} {host:>11.1f} {diff:>9.4f}{cols}")
    if a.out:
        a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
