"""`minisgl bench stall`: how long running decodes wait while a long prompt is prefilled. Streams decode
(long max_tokens, streamed); once they run, one or more long prompts arrive; every streamed token's arrival
time is kept, and the gaps between a stream's tokens are sorted into before the first long prompt, during a
long prompt's prefill (from its send to its first token) and after.

A server whose steps are either prefill or decode holds every stream for the whole prefill; one with mixed
steps (a chunk of the prompt beside the running decodes in each step) holds them for one step at most. The
report gives, per window, the number of gaps and their mean (the TPOT), p50, p99 and max; per long prompt,
its prefill time (its TTFT), the longest gap of any stream during it, and how many tokens each stream got
meanwhile (0: the streams were stalled for the whole prefill).

The streams are spread over `--processes` client processes (each an asyncio loop, as in `serve`), so that
reading 30,000 chunks a second does not delay the timestamps; the long prompts go from the first process.
Timestamps are `perf_counter` (CLOCK_MONOTONIC, one clock for all the processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from array import array
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

import numpy as np

DESCRIPTION = __doc__.split("\n\n")[0]

EPILOG = """\
examples:
  minisgl bench stall --streams 32 --long-input-len 16000 --out stall.json     # against minisgl serve
  minisgl bench stall --base-url http://127.0.0.1:1919 --long-count 2 --spacing-s 1.5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minisgl.bench.serve import add_server_arguments

    add_server_arguments(p, timeout_s=600.0)

    g = p.add_argument_group("load")
    g.add_argument("--streams", type=int, default=32, help="decoding streams, started together")
    g.add_argument("--stream-input-len", type=int, default=128, help="each stream's prompt, in words")
    g.add_argument(
        "--stream-output-len",
        type=int,
        default=3000,
        help="each stream's max_tokens: enough to run from before the first long prompt to after the last",
    )
    g.add_argument("--long-input-len", type=int, default=16000, help="the long prompts' length, in words")
    g.add_argument("--long-output-len", type=int, default=32, help="the long prompts' max_tokens")
    g.add_argument("--long-count", type=int, default=1, help="long prompts, sent --spacing-s apart")
    g.add_argument(
        "--delay-s", type=float, default=1.0, help="from the streams' start to the first long prompt"
    )
    g.add_argument("--spacing-s", type=float, default=1.0, help="between the long prompts' sends")
    g.add_argument(
        "--processes",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="client processes the streams are spread over (default: the CPUs, at most 8: %(default)s)",
    )
    g.add_argument("--warmup", type=int, default=1, help="short requests per process before the start")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--seed", type=int, default=0, help="the prompts")

    g = p.add_argument_group("report")
    g.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    g.add_argument("--label", default=None, help="the server's name in the JSON")
    g.add_argument("--no-progress", action="store_true", help="accepted for symmetry with serve (no bar)")


@dataclass
class Job:
    """What one process sends: its streams and, in the first process, the long prompts."""

    plan: object  # a loadgen.Plan: url, headers, the body's fixed fields
    streams: list  # Turn
    longs: list  # Turn
    warmup: list  # Turn
    delay_s: float
    spacing_s: float


async def run_job(job: Job, ready, go, progress):
    import aiohttp

    from minisgl.bench.loadgen import Columns, Runner
    from minisgl.bench.workloads import Conversation

    plan = job.plan
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm = Runner(plan, session, progress, Columns())
        await asyncio.gather(*(warm.conversation(Conversation([t]), None, True) for t in job.warmup))
        streams, longs = (
            Runner(plan, session, progress, Columns()),
            Runner(plan, session, progress, Columns()),
        )
        history = Runner.start_history(Conversation([]), plan.chat)
        bodies = [streams.body(history, t) for t in job.streams]
        long_bodies = [longs.body(history, t) for t in job.longs]
        stream_stamps = [array("d") for _ in job.streams]
        long_stamps = [array("d") for _ in job.longs]
        ready.put((plan.index, warm.cols.errors))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start = perf_counter()

        async def long_prompt(k: int) -> None:
            delay = start + job.delay_s + k * job.spacing_s - perf_counter()
            await asyncio.sleep(max(0.0, delay))
            await longs.request(long_bodies[k], True, job.longs[k].max_tokens, stamps=long_stamps[k])

        await asyncio.gather(
            *(
                streams.request(b, True, t.max_tokens, stamps=s)
                for b, t, s in zip(bodies, job.streams, stream_stamps, strict=True)
            ),
            *(long_prompt(k) for k in range(len(job.longs))),
        )
        return streams.cols, stream_stamps, longs.cols, long_stamps


def process_main(index: int, job: Job, ready, go, results, progress) -> None:
    try:
        out = asyncio.run(run_job(job, ready, go, progress))
    except BaseException:
        ready.put((index, None))
        results.put((index, None, traceback.format_exc()))
        sys.exit(1)
    results.put((index, out, None))


# ------------------------------------------------------------------------------------------------ analysis


def gap_stats(gaps: np.ndarray) -> dict:
    """Count, mean, p50, p99 and max of gaps in seconds, in ms."""
    if gaps.size == 0:
        return {"gaps": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = gaps * 1000.0
    p50, p99 = np.percentile(ms, [50, 99]).tolist()
    return {
        "gaps": int(ms.size),
        "mean_ms": float(ms.mean()),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": float(ms.max()),
    }


def analyse(stream_stamps: list[np.ndarray], windows: list[tuple[float, float] | None]) -> dict:
    """Sorts every stream's gaps by window. `windows`: per long prompt, (send, first token), or None where
    it failed. A gap (a, b) is `during` when it overlaps a window, `before` when it ends before the first
    send, `after` otherwise."""
    valid = [w for w in windows if w is not None]
    first_send = min((w[0] for w in valid), default=math.inf)
    classes: dict[str, list[np.ndarray]] = {"before": [], "during": [], "after": []}
    per_window: list[list[np.ndarray]] = [[] for _ in windows]
    tokens_in: list[list[int]] = [[] for _ in windows]
    for st in stream_stamps:
        if st.size == 0:
            continue
        a, b = st[:-1], st[1:]
        gaps = b - a
        during = np.zeros(gaps.size, dtype=bool)
        for k, w in enumerate(windows):
            if w is None:
                continue
            s, f = w
            hit = (b > s) & (a < f)
            during |= hit
            per_window[k].append(gaps[hit])
            if st[0] < s and st[-1] > f:  # the stream ran through the whole window
                tokens_in[k].append(int(((st > s) & (st <= f)).sum()))
        before = ~during & (b <= first_send)
        classes["during"].append(gaps[during])
        classes["before"].append(gaps[before])
        classes["after"].append(gaps[~during & ~before])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0)

    events = []
    for k, w in enumerate(windows):
        if w is None:
            events.append({"index": k, "ok": False})
            continue
        stats = gap_stats(cat(per_window[k]))
        counts = tokens_in[k]
        events.append(
            {
                "index": k,
                "ok": True,
                "prefill_ms": (w[1] - w[0]) * 1000.0,
                "streams_through": len(counts),
                "tokens_per_stream_min": min(counts) if counts else None,
                "tokens_per_stream_mean": float(np.mean(counts)) if counts else None,
                "streams_without_token": sum(1 for c in counts if c == 0),
                "max_gap_ms": stats["max_ms"],
                "p99_gap_ms": stats["p99_ms"],
                "mean_gap_ms": stats["mean_ms"],
            }
        )
    return {"gaps_ms": {name: gap_stats(cat(parts)) for name, parts in classes.items()}, "events": events}


# ------------------------------------------------------------------------------------------------ the run


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from minisgl.bench import serve
    from minisgl.bench import workloads as wl
    from minisgl.bench.loadgen import Plan

    if min(a.streams, a.processes, a.long_count, a.long_input_len, a.stream_input_len) < 1:
        p.error("--streams, --processes, --long-count and the input lengths are >= 1")
    if a.stream_output_len < 2 or a.long_output_len < 1:
        p.error("--stream-output-len is >= 2 (gaps need two tokens), --long-output-len >= 1")
    rng = np.random.default_rng(a.seed)
    streams = [wl.Turn(wl.words(rng, a.stream_input_len), a.stream_output_len) for _ in range(a.streams)]
    longs = [wl.Turn(wl.words(rng, a.long_input_len), a.long_output_len) for _ in range(a.long_count)]
    warm = wl.Turn(wl.words(np.random.default_rng(a.seed + 1), 16), 4)
    if a.model is None:
        a.model = serve.first_model(a.base_url, a.api_key)
    base = {"model": a.model, "stream": True, "stream_options": {"include_usage": True}}
    base |= {"temperature": a.temperature, "ignore_eos": True}
    url = a.base_url.rstrip("/") + ("/v1/chat/completions" if a.endpoint == "chat" else "/v1/completions")
    k = max(1, min(a.processes, a.streams))
    jobs = []
    for i in range(k):
        plan = Plan(
            index=i,
            url=url,
            chat=a.endpoint == "chat",
            headers=serve.headers(a.api_key),
            base=base,
            conversations=[],
            warmup=[],
            rate=None,
            concurrency=None,
            seed=a.seed,
            timeout_s=a.timeout,
            want_text=False,
        )
        jobs.append(
            Job(plan, streams[i::k], longs if i == 0 else [], [warm] * a.warmup, a.delay_s, a.spacing_s)
        )
    print(
        f"# {a.base_url} model={a.model} streams={a.streams} ({a.stream_input_len} words in, "
        f"{a.stream_output_len} out) long={a.long_count} x {a.long_input_len} words processes={k}",
        flush=True,
    )
    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    progress = ctx.RawArray("q", k)
    procs = [
        ctx.Process(target=process_main, args=(i, j, ready, go, results, progress))
        for i, j in enumerate(jobs)
    ]
    for proc in procs:
        proc.start()
    try:
        serve.wait_ready(ready, procs)
        go.set()
        outs = serve.collect(results, procs, progress, a.streams + a.long_count, True)
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    report = summarize(a, outs)
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0


def summarize(a: argparse.Namespace, outs: list) -> dict:
    stream_cols = [o[0] for o in outs]
    stamps = [np.frombuffer(s, dtype=np.float64) for o in outs for s in o[1]]
    ok = np.concatenate([np.frombuffer(c.ok, dtype=np.int8) for c in stream_cols]).astype(bool)
    errors: dict[str, int] = {}
    for c in stream_cols:
        for e in c.errors:
            errors[e] = errors.get(e, 0) + 1
    sent = []  # (send time, the long prompt's record, its prefill window or None)
    for o in outs:
        c = o[2]
        failures = iter(c.errors)  # one per failed request, in order
        for j in range(len(c.ok)):
            good = bool(c.ok[j])
            record = {
                "ok": good,
                "error": None if good else next(failures, "?"),
                "ttft_ms": c.ttft[j] * 1000.0 if good else None,
                "e2e_ms": (c.end[j] - c.start[j]) * 1000.0,
                "prompt_tokens": c.prompt_tokens[j] if c.prompt_tokens[j] >= 0 else None,
                "cached_tokens": c.cached_tokens[j] if c.cached_tokens[j] >= 0 else None,
                "output_tokens": c.output_tokens[j],
            }
            sent.append((c.start[j], record, (c.start[j], c.start[j] + c.ttft[j]) if good else None))
    sent.sort(key=lambda x: x[0])  # event k is the k-th long prompt sent
    longs, windows = [x[1] for x in sent], [x[2] for x in sent]
    first_send = min((w[0] for w in windows if w is not None), default=math.inf)
    analysis = analyse(stamps, windows)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    for key in ("api_key", "func", "out", "no_progress", "label"):
        config.pop(key, None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "label": a.label,
        "config": config,
        "streams": {
            "requested": a.streams,
            "completed": int(ok.sum()),
            "failed": int((~ok).sum()),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
            # A stream whose first token came after the first long prompt was sent was not yet decoding.
            "decoding_before_long": int(sum(1 for s in stamps if s.size and s[0] < first_send)),
            "tokens": int(sum(s.size for s in stamps)),
        },
        "long": longs,
        **analysis,
    }


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_report(r: dict, file=None) -> None:
    file = file or sys.stdout
    s = r["streams"]
    print(
        f"streams: {s['completed']} completed, {s['failed']} failed, {s['decoding_before_long']} decoding "
        f"before the first long prompt, {s['tokens']} tokens",
        file=file,
    )
    for e, n in s["errors"].items():
        print(f"  {n} failed: {e}", file=file)
    print(f"{'window':>8} {'gaps':>7} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}   (ms)", file=file)
    for name, g in r["gaps_ms"].items():
        print(
            f"{name:>8} {g['gaps']:>7} {fmt(g['mean_ms']):>8} {fmt(g['p50_ms']):>8} {fmt(g['p99_ms']):>8} "
            f"{fmt(g['max_ms']):>8}",
            file=file,
        )
    for ev, lp in zip(r["events"], r["long"], strict=True):
        if not ev["ok"]:
            print(f"long {ev['index']}: failed: {lp['error']}", file=file)
            continue
        print(
            f"long {ev['index']}: {lp['prompt_tokens']} prompt tokens ({fmt(lp['cached_tokens'], 0)} "
            f"cached), prefill (TTFT) {fmt(ev['prefill_ms'], 1)} ms; streams' gaps during it: "
            f"max {fmt(ev['max_gap_ms'])}, p99 {fmt(ev['p99_gap_ms'])}, mean {fmt(ev['mean_gap_ms'])} ms; "
            f"tokens per stream meanwhile: min {ev['tokens_per_stream_min']}, "
            f"mean {fmt(ev['tokens_per_stream_mean'], 1)} ({ev['streams_without_token']} of "
            f"{ev['streams_through']} streams got none)",
            file=file,
        )
