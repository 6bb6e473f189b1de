#!/usr/bin/env python3
"""GPU benchmark of decode attention alone: minisgl's Triton kernel (kernels/decode_attention.py) against
FlashInfer 0.5.3's tensor-core decode, on Qwen2.5-0.5B's shapes (Hq 14, Hkv 2, D 64, bf16, page size 16) with
random page tables.

Each variant is timed inside a CUDA graph (one call captured, replayed) and eagerly. GPU time is taken per
call between CUDA events, with the host queueing every call behind a sleep kernel so that no call waits on
Python, and reported as the median over the replays: "warm" back to back (small caches stay in L2), "cold"
with L2 flushed before each call (as in a real step, where every layer reads its own cache). Eager calls
also get the host time per call. Every result is checked against a torch reference (max abs error).

    python scripts/bench_attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py")]

HQ, HKV, D, PAGE = 14, 2, 64, 16
DTYPE = torch.bfloat16
REPS = 100
SLEEP_S = 0.05  # the head start the GPU gets while the host queues REPS calls
L2_FLUSH_BYTES = 256 << 20
DEADLINE_S = 165  # variants left after this are skipped, to stay under three minutes
BAD_ERR = 0.05  # bf16 output with float32 accumulation stays far below this


def cases() -> list[tuple[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randint(100, 2049, (140,), generator=g).tolist()
    return [
        ("1x64", [64]),
        ("1x2048", [2048]),
        ("16x96", [96] * 16),
        ("64x160", [160] * 64),
        ("256x160", [160] * 256),
        ("140xU(100..2048)", mixed),
        ("256x1024", [1024] * 256),
    ]


def make_batch(lens: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / PAGE) for n in lens]
    total = sum(pages)
    pool = torch.randperm(total + 16, generator=g)[:total]  # out of order, with unused pages between
    num_pages = total + 16
    k = torch.randn(num_pages, PAGE, HKV, D, generator=g).to(DTYPE)
    v = torch.randn(num_pages, PAGE, HKV, D, generator=g).to(DTYPE)
    indptr = torch.tensor([0, *pages]).cumsum(0).to(torch.int32)
    seq_len = torch.tensor(lens, dtype=torch.int32)
    last = seq_len - (torch.tensor(pages, dtype=torch.int32) - 1) * PAGE
    dev = "cuda"
    return {
        "q": torch.randn(len(lens), HQ, D, generator=g).to(DTYPE).to(dev),
        "k": k.to(dev),
        "v": v.to(dev),
        "indptr": indptr.to(dev),
        "indices": pool.to(torch.int32).to(dev),
        "seq_len": seq_len.to(dev),
        "indptr_host": indptr,
        "last_host": last,
        "lens": lens,
    }


def reference(b: dict) -> torch.Tensor:
    """float32 attention over each request's tokens, gathered through its page table (padded, masked)."""
    n, lmax = len(b["lens"]), max(b["lens"])
    pos = torch.arange(lmax, device="cuda")
    valid = pos[None, :] < b["seq_len"][:, None].long()
    slot = torch.where(valid, b["indptr"][:-1, None].long() + pos[None, :] // PAGE, 0)
    loc = b["indices"].long()[slot] * PAGE + pos[None, :] % PAGE
    k = b["k"].view(-1, HKV, D)[loc].float()  # [n, L, Hkv, D]
    v = b["v"].view(-1, HKV, D)[loc].float()
    q = b["q"].float().view(n, HKV, HQ // HKV, D)
    s = torch.einsum("nhgd,nlhd->nhgl", q, k) * D**-0.5
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgl,nlhd->nhgd", s.softmax(-1), v)
    return out.reshape(n, HQ, D)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item()


class Timer:
    def __init__(self) -> None:
        self.flush_buf = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        self.cycles = int(SLEEP_S * 1.98e9)  # H200 boost clock; only a head start, need not be exact

    def gpu_us(self, fn, cold: bool) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
        torch.cuda.synchronize()
        # A private torch call: should it be gone, the times may include host gaps, nothing worse.
        with contextlib.suppress(Exception):
            torch.cuda._sleep(self.cycles)
        for i in range(REPS):
            if cold:
                self.flush_buf.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1000 for s, e in zip(starts, ends, strict=True)]

    def host_us(self, fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / REPS * 1e6


def graph_of(fn) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # the warm-up of the captured form
    torch.cuda.synchronize()
    return graph


def measure(timer: Timer, fn, out_of, want, graph: bool) -> dict:
    """Times `fn` (already warmed up once), as a replayed graph or eagerly; `out_of()` is its output."""
    rec: dict = {}
    if graph:
        g = graph_of(fn)
        out_of().fill_(float("nan"))  # a replay that skipped its write would show as NaN
        run = g.replay
    else:
        run = fn
        rec["host_us"] = timer.host_us(run)
    warm = timer.gpu_us(run, cold=False)
    cold = timer.gpu_us(run, cold=True)
    rec.update(
        warm_us=statistics.median(warm),
        warm_p10_us=sorted(warm)[REPS // 10],
        warm_p90_us=sorted(warm)[REPS * 9 // 10],
        cold_us=statistics.median(cold),
        max_err=max_err(out_of(), want),
    )
    return rec


def flashinfer_variants(b: dict, want, timer: Timer) -> list[dict]:
    import flashinfer  # an ImportError here turns FlashInfer off for the rest of the run

    n = len(b["lens"])
    common = dict(q_data_type=DTYPE, kv_data_type=DTYPE)
    records = []
    for graph in (True, False):
        rec = {"impl": "flashinfer", "variant": "tensor-core decode", "mode": "graph" if graph else "eager"}
        try:
            workspace = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
            if graph:
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=True,
                    paged_kv_indptr_buffer=torch.zeros(n + 1, dtype=torch.int32, device="cuda"),
                    paged_kv_indices_buffer=torch.zeros(len(b["indices"]), dtype=torch.int32, device="cuda"),
                    paged_kv_last_page_len_buffer=torch.zeros(n, dtype=torch.int32, device="cuda"),
                )
            else:
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=True
                )
            wrapper.plan(b["indptr_host"], b["indices"], b["last_host"], HQ, HKV, D, PAGE, **common)
            holder = {}

            def call(wrapper=wrapper, holder=holder):
                holder["out"] = wrapper.run(b["q"], (b["k"], b["v"]))

            call()
            torch.cuda.synchronize()
            # Captured, run() allocates its output from the graph's pool: that tensor is what replays fill.
            rec.update(measure(timer, call, lambda holder=holder: holder["out"], want, graph))
        except Exception:
            rec["error"] = traceback.format_exc()
            print(rec["error"], flush=True)
        records.append(rec)
    return records


def ours(
    b: dict, want, timer: Timer, splits: int, block_n: int, warps: int, stages: int, fused: bool, graph: bool
):
    from minisgl.kernels import decode_attention as td

    n = len(b["lens"])
    name = f"s={splits} block={block_n} warps={warps} stages={stages}" + (" fused" if fused else "")
    rec = {"impl": "triton", "variant": name, "mode": "graph" if graph else "eager", "splits": splits}
    rec.update(block_n=block_n, num_warps=warps, num_stages=stages, fused_combine=fused)
    try:
        out = torch.empty_like(b["q"])
        partial = td.alloc_partial(n, HQ, D, splits, "cuda")
        counters = td.alloc_counters(n, HKV, "cuda")

        def call():
            td.decode_attention(
                b["q"],
                b["k"],
                b["v"],
                b["indptr"],
                b["indices"],
                b["seq_len"],
                out,
                partial,
                splits,
                fused_combine=fused,
                counters=counters,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
            )

        call()  # compiles, and warms up
        torch.cuda.synchronize()
        rec.update(measure(timer, call, lambda: out, want, graph))
        if fused:
            rec["counters_zero"] = bool(counters.eq(0).all().item())
    except Exception:
        rec["error"] = traceback.format_exc()
        print(rec["error"], flush=True)
    return rec


def our_variants(lens: list[int]) -> list[tuple]:
    """(splits, block_n, warps, stages, fused, graph): the defaults at splits_for's count, eager and in a
    graph; other split counts; the fused combine; other block shapes."""
    from minisgl.kernels import decode_attention as td

    auto = td.splits_for(
        len(lens), max(lens), num_sms=torch.cuda.get_device_properties(0).multi_processor_count
    )
    base = (td.BLOCK_N, td.NUM_WARPS, td.NUM_STAGES)
    out = [(auto, *base, False, True), (auto, *base, False, False)]
    for s in sorted({1, max(1, auto // 2), auto * 2, 8} - {auto}):
        out.append((s, *base, False, True))
    out.append((auto, *base, True, True))
    for shape in [(32, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2)]:
        if shape != base:
            out.append((auto, *shape, False, True))
    return out


def print_table(records: list[dict]) -> None:
    head = f"{'case':<18} {'impl':<10} {'mode':<5} {'variant':<38} "
    head += f"{'warm us':>8} {'cold us':>8} {'host us':>8} {'err':>8}"
    print(head)
    print("-" * len(head))
    for r in records:
        if "error" in r:
            tail = "ERROR " + r["error"].strip().splitlines()[-1][:60]
        elif "skipped" in r:
            tail = "skipped (time)"
        else:
            host = f"{r['host_us']:8.1f}" if "host_us" in r else f"{'':>8}"
            flag = "  BAD" if not r["max_err"] <= BAD_ERR else ""
            tail = f"{r['warm_us']:8.1f} {r['cold_us']:8.1f} {host} {r['max_err']:8.4f}{flag}"
        print(f"{r['case']:<18} {r['impl']:<10} {r['mode']:<5} {r['variant']:<38} {tail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_attention.json", help="where the JSON results go")
    ap.add_argument("--no-flashinfer", action="store_true", help="time the Triton kernel only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU; none is visible to torch", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    timer = Timer()
    records: list[dict] = []
    flashinfer_ok = not args.no_flashinfer
    for case_no, (case, lens) in enumerate(cases()):
        b = make_batch(lens, seed=case_no)
        want = reference(b)
        print(
            f"== {case}: {len(lens)} requests, {sum(lens)} tokens ({time.monotonic() - t0:.0f} s)", flush=True
        )
        todo: list = []
        if flashinfer_ok:
            todo.append(("flashinfer", None))
        todo += [("triton", v) for v in our_variants(lens)]
        for impl, variant in todo:
            if time.monotonic() - t0 > DEADLINE_S:
                records.append(
                    {"case": case, "impl": impl, "mode": "-", "variant": str(variant), "skipped": True}
                )
                continue
            if impl == "flashinfer":
                try:
                    got = flashinfer_variants(b, want, timer)
                except Exception:
                    print(
                        traceback.format_exc(),
                        "flashinfer unusable: timing the Triton kernel only",
                        flush=True,
                    )
                    flashinfer_ok = False
                    continue
            else:
                got = [ours(b, want, timer, *variant)]
            for r in got:
                r.update(case=case, batch=len(lens), tokens=sum(lens))
                records.append(r)
        del b, want
        torch.cuda.empty_cache()
    print()
    print_table(records)
    meta = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "reps": REPS,
        "seconds": round(time.monotonic() - t0, 1),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
        import flashinfer

        meta["flashinfer"] = flashinfer.__version__
    except Exception:
        pass
    Path(args.out).write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    print(f"\nwrote {args.out} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
