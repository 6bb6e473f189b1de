"""`minisgl bench engine`: the engine's own throughput on `serve`'s random workload, through a running
engine's ZeroMQ socket instead of HTTP: the same chat prompts (the same words, the same seed), the same output
lengths with ignore_eos, the same number in flight, but no streaming, no HTTP and no SSE parsing. What
`bench serve` measures at the same concurrency, over this, is what the HTTP front end and the client cost.

One process is enough: each request costs the client one message out and one in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from minisgl.bench import workloads as wl

EPILOG = """\
example (beside `minisgl bench serve --concurrency 64,256 --input-len 128 --output-len 128`):
  minisgl bench engine --address tcp://127.0.0.1:5557 --concurrency 64,256 --input-len 128 --output-len 128
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="tcp://127.0.0.1:5557", help="the engine's ZeroMQ socket")
    p.add_argument("--concurrency", default="64", help="requests in flight; a list runs each: 64,256")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024, help="words per prompt (about one token each)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="the same seed as `serve` gives the same prompts")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--label", default=None)
    p.add_argument("--out", type=Path, default=None, help="write the runs as JSON")


def run_window(address: str, convs: list[wl.Conversation], concurrency: int, temperature: float) -> dict:
    from minisgl.client import Client

    latencies, tokens, errors = [], 0, []
    with Client(address, timeout_s=600) as client:
        started: dict[str, float] = {}
        pending = iter(convs)

        def send_next() -> bool:
            conv = next(pending, None)
            if conv is None:
                return False
            turn = conv.turns[0]
            sampling = {"max_tokens": turn.max_tokens, "temperature": temperature, "ignore_eos": True}
            messages = [{"role": "user", "content": turn.prompt}]
            started[client.submit(messages=messages, sampling=sampling, stream=False)] = time.perf_counter()
            return True

        t0 = time.perf_counter()
        while len(started) < concurrency and send_next():
            pass
        while started:
            msg = client.recv_any()
            rid = msg.get("rid")
            if rid not in started:
                continue
            latencies.append(time.perf_counter() - started.pop(rid))
            if msg["type"] == "final" and msg["finish_reason"] != "error":
                tokens += msg["completion_tokens"]
            else:
                errors.append(msg.get("message") or msg.get("code"))
            send_next()
        seconds = time.perf_counter() - t0
    e2e = np.asarray(latencies) * 1e3
    quantiles = {f"p{q}": float(np.percentile(e2e, q)) for q in (50, 90, 99)}
    return {
        "concurrency": concurrency,
        "completed": len(latencies) - len(errors),
        "failed": len(errors),
        "errors": sorted(set(map(str, errors)))[:10],
        "duration_s": seconds,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / seconds,
        "requests_per_s": len(latencies) / seconds,
        "e2e_ms": {"mean": float(e2e.mean()), **quantiles},
    }


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    try:
        levels = [int(c) for c in str(a.concurrency).split(",")]
    except ValueError:
        p.error(f"--concurrency takes numbers: {a.concurrency!r}")
    if any(c < 1 for c in levels):
        p.error("--concurrency must be at least 1")
    convs = wl.random_workload(a.num_prompts, a.input_len, a.output_len, a.range_ratio, a.seed)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "label": a.label,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "func"},
        "runs": [],
    }
    print(f"# {a.address}: {len(convs)} requests, {a.input_len} words in, {a.output_len} tokens out")
    print(
        f"{'concurrency':>11} {'done':>6} {'failed':>6} {'seconds':>8} {'out tok/s':>10} {'e2e p50 ms':>10}"
    )
    for c in levels:
        r = run_window(a.address, convs, c, a.temperature)
        report["runs"].append(r)
        print(
            f"{c:>11} {r['completed']:>6} {r['failed']:>6} {r['duration_s']:>8.2f} "
            f"{r['output_tok_per_s']:>10.0f} {r['e2e_ms']['p50']:>10.1f}",
            flush=True,
        )
        if a.out:
            a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in report["runs"]) else 1
