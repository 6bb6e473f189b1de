"""`minisgl bench serve`: an online load generator for any OpenAI-compatible server (minisgl, mini-sglang,
vLLM, SGLang), with streamed requests timed chunk by chunk.

The requests are spread over K processes (`--processes`), each an asyncio loop with one aiohttp session, so
that the client is not what limits the measurement: one Python process parses some tens of thousands of
streamed chunks a second. Poisson arrivals at rate R/K in each of K processes are Poisson arrivals at rate R
overall; a concurrency of N is N/K streams per process (the remainder to the first processes).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from minisgl.bench import workloads as wl

DESCRIPTION = __doc__.split("\n\n")[0]

EPILOG = """\
workloads:
  random         --num-prompts prompts of --input-len words, --output-len tokens each
  shared-prefix  the same, each prompt after one of --num-prefixes prefixes of --prefix-len words (the
                 system message on the chat endpoint)
  multi-turn     --num-prompts conversations of --turns user messages; each turn is sent with the whole
                 history, earlier answers included, once the previous answer is complete
  dataset        --dataset FILE, JSON lines, one request a line:
                   {"prompt": "text"}   or {"prompt": [token ids]} (completions endpoint)
                   {"messages": [{"role": "user", "content": "..."}]}          (chat endpoint)
                   {"turns": ["first user message", "second", ...]}           (a conversation)
                 each with an optional "max_tokens" (default --output-len); --num-prompts takes the first
                 N (going round again when the file has fewer), default all

lengths are in words of a fixed list of common English words, about one token each (the chat template adds
its own tokens); --range-ratio R draws each length uniformly in [L*(1-R), L*(1+R)].

metrics: TTFT from before the request is sent to the first chunk with generated text; ITL the gaps between
chunks with text; TPOT (e2e - TTFT) / (output tokens - 1) per request; output tokens from the server's usage
(else max_tokens under --ignore-eos, else the chunks with text); goodput the requests per second that
met every --slo-* given.

examples:
  minisgl bench serve --num-prompts 200 --request-rate 1,2,4,8,inf --out ours.json --label minisgl
  minisgl bench serve --base-url http://127.0.0.1:30000 --concurrency 1,8,64 --out sglang.json
  minisgl bench plot ours.json sglang.json -o rates.png
"""


def rate_list(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",")]
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError("request rates are > 0 (inf: every request at once)")
    return rates


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrencies are >= 1")
    return values


def add_server_arguments(p: argparse.ArgumentParser, timeout_s: float) -> None:
    """The flags that say which server the benchmark talks to, and how (every `bench` client's)."""
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's address")
    g.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        default="chat",
        help="POST /v1/chat/completions or /v1/completions, streamed",
    )
    g.add_argument("--model", default=None, help="the model field (default: the first id of GET /v1/models)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("MINISGL_API_KEY"),
        help="sent as `Authorization: Bearer KEY` (default: $MINISGL_API_KEY)",
    )
    g.add_argument("--timeout", type=float, default=timeout_s, help="seconds one request may take in all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, timeout_s=3600.0)

    g = p.add_argument_group("workload")
    g.add_argument(
        "--workload",
        choices=("random", "shared-prefix", "multi-turn", "dataset"),
        default="random",
        help="what the requests are (below)",
    )
    g.add_argument("--dataset", type=Path, default=None, help="the JSONL file of --workload dataset")
    g.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests (conversations for multi-turn) per run (default: 1000, all of a dataset)",
    )
    g.add_argument("--input-len", type=int, default=1024, help="prompt length in words (about tokens)")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    g.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [L*(1-R), L*(1+R)]")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: words in each prefix")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes")
    g.add_argument(
        "--prefix-seed",
        type=int,
        default=None,
        help="shared-prefix: draw the prefixes from this seed, apart from the rest (runs with another --seed "
        "then ask new questions after the same prefixes: a second round against a warm cache); default: "
        "from --seed",
    )
    g.add_argument("--turns", type=int, default=4, help="multi-turn: user messages per conversation")
    g.add_argument(
        "--token-ids",
        action="store_true",
        help="completions endpoint: prompts as arrays of random token ids in [0, 10000), not text",
    )
    g.add_argument("--seed", type=int, default=0, help="prompts and arrival times")

    g = p.add_argument_group("load")
    m = g.add_mutually_exclusive_group()
    m.add_argument(
        "--request-rate",
        type=rate_list,
        default=None,
        help="requests per second, Poisson arrivals; inf sends all at once; a list (1,2,4,inf) runs each "
        "in turn (default: inf)",
    )
    m.add_argument(
        "--concurrency",
        type=int_list,
        default=None,
        help="a fixed number of requests in flight instead; a list (1,8,64) runs each in turn",
    )
    g.add_argument(
        "--processes",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="client processes the requests are spread over (default: the CPUs, at most 8: %(default)s)",
    )
    g.add_argument("--warmup", type=int, default=1, help="requests sent before each run, not measured")

    g = p.add_argument_group("sampling")
    g.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the ignore_eos extension (vLLM, SGLang, minisgl) so that every request generates exactly "
        "max_tokens",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")

    g = p.add_argument_group("report")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request meets TTFT <= this")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: and TPOT <= this")
    g.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    g.add_argument("--plot", type=Path, default=None, help="draw the runs (PNG), as `minisgl bench plot`")
    g.add_argument("--label", default=None, help="the server's name in the JSON and plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def first_model(base_url: str, api_key: str | None) -> str:
    """The first model the server lists; a placeholder (and a warning) if it cannot say, so that the run
    still goes on to report each request's failure."""
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/models", headers=headers(api_key))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        print(f"warning: GET /v1/models failed ({e}); sending model 'default'", file=sys.stderr)
        return "default"


def build_workload(
    a: argparse.Namespace, num: int | None, seed: int, prefix_seed: int | None = None
) -> list[wl.Conversation]:
    n = 1000 if num is None else num
    common = (a.input_len, a.output_len, a.range_ratio, seed)
    if a.workload == "random":
        return wl.random_workload(n, *common, token_ids=a.token_ids)
    if a.workload == "shared-prefix":
        return wl.shared_prefix_workload(
            n, *common, a.prefix_len, a.num_prefixes, token_ids=a.token_ids, prefix_seed=prefix_seed
        )
    if a.workload == "multi-turn":
        return wl.multi_turn_workload(n, *common, a.turns)
    return wl.take(wl.read_dataset(a.dataset, a.output_len), num)


def check(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if a.workload == "dataset" and a.dataset is None:
        p.error("--workload dataset needs --dataset FILE")
    if a.dataset is not None and a.workload != "dataset":
        p.error("--dataset goes with --workload dataset")
    if a.token_ids and a.endpoint != "completions":
        p.error("--token-ids needs --endpoint completions")
    if a.token_ids and a.workload == "multi-turn":
        p.error("--token-ids and multi-turn: the answers come back as text, not ids")
    if not 0 <= a.range_ratio <= 1:
        p.error("--range-ratio is in [0, 1]")
    if a.processes < 1 or (a.num_prompts is not None and a.num_prompts < 1):
        p.error("--processes and --num-prompts are >= 1")


# ------------------------------------------------------------------------------------------------ one run


def run_once(
    a: argparse.Namespace,
    convs: list[wl.Conversation],
    warmup: list[wl.Conversation],
    base: dict,
    rate: float | None,
    concurrency: int | None,
) -> dict:
    from minisgl.bench.loadgen import Plan, process_main

    k = max(1, min(a.processes, len(convs), concurrency or len(convs)))
    url = a.base_url.rstrip("/") + ("/v1/chat/completions" if a.endpoint == "chat" else "/v1/completions")
    plans = [
        Plan(
            index=i,
            url=url,
            chat=a.endpoint == "chat",
            headers=headers(a.api_key),
            base=base,
            conversations=convs if concurrency is not None else convs[i::k],
            warmup=warmup[i::k],
            rate=None if rate is None else rate / k,
            concurrency=None if concurrency is None else concurrency // k + (i < concurrency % k),
            seed=a.seed * 1_000_003 + i,
            timeout_s=a.timeout,
            want_text=any(len(c.turns) > 1 for c in convs),
        )
        for i in range(k)
    ]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or loops
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    progress = ctx.RawArray("q", k)
    counter = ctx.Value("q", 0)  # the next conversation to start, under a concurrency
    args = (ready, go, results, progress, counter)
    procs = [ctx.Process(target=process_main, args=(pl, *args)) for pl in plans]
    for proc in procs:
        proc.start()
    try:
        wait_ready(ready, procs)
        go.set()
        columns = collect(results, procs, progress, sum(len(c.turns) for c in convs), a.no_progress)
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return summarize(a, columns, rate, concurrency, k)


def wait_ready(ready, procs) -> None:
    """Until every process has warmed up, or one has died (its traceback is on stderr, and `collect` says)."""
    waiting = len(procs)
    while waiting:
        try:
            _, warmup_errors = ready.get(timeout=0.5)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                return
            continue
        waiting -= 1
        if warmup_errors:
            print(f"warning: a warm-up request failed: {warmup_errors[0]}", file=sys.stderr)


def collect(results, procs, progress, total: int, quiet: bool) -> list:
    from tqdm import tqdm

    columns: dict[int, object] = {}
    with tqdm(total=total, unit="req", file=sys.stderr, disable=quiet, dynamic_ncols=True) as bar:
        while len(columns) < len(procs):
            try:
                index, cols, failure = results.get(timeout=0.1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                    raise RuntimeError("a client process died; see its traceback above") from None
            else:
                if failure is not None:
                    raise RuntimeError(f"client process {index} failed:\n{failure}")
                columns[index] = cols
            bar.update(sum(progress) - bar.n)
    return list(columns.values())


def percentiles(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)] * 1000.0
    if values.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"mean": float(values.mean()), "p50": p50, "p90": p90, "p99": p99}


def summarize(a: argparse.Namespace, columns: list, rate: float | None, concurrency: int | None, k: int):
    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([np.frombuffer(getattr(c, name), dtype=dtype) for c in columns])

    ok = cat("ok", np.int8).astype(bool)
    start, end = cat("start", np.float64), cat("end", np.float64)
    ttft, tpot = cat("ttft", np.float64), cat("tpot", np.float64)
    out_tokens, prompt_tokens = cat("output_tokens", np.int64), cat("prompt_tokens", np.int64)
    cached, turn = cat("cached_tokens", np.int64), cat("turn", np.int16)
    duration = float(end.max() - start.min()) if start.size else 0.0
    per_s = 1.0 / duration if duration > 0 else math.nan
    errors: dict[str, int] = {}
    for c in columns:
        for e in c.errors:
            errors[e] = errors.get(e, 0) + 1
    known_prompt = ok & (prompt_tokens >= 0)
    known_cached = ok & (cached >= 0)
    run = {
        "rate": None if rate is None else ("inf" if rate == math.inf else rate),
        "concurrency": concurrency,
        "processes": k,
        "completed": int(ok.sum()),
        "failed": int((~ok).sum()),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "duration_s": duration,
        "requests_per_s": float(ok.sum()) * per_s,
        "output_tokens": int(out_tokens[ok].sum()),
        "input_tokens": int(prompt_tokens[known_prompt].sum()) if known_prompt.any() else None,
        "output_tok_per_s": float(out_tokens[ok].sum()) * per_s,
        "input_tok_per_s": float(prompt_tokens[known_prompt].sum()) * per_s if known_prompt.any() else None,
        "chunks_per_s": float(cat("chunks", np.int64).sum()) * per_s,
        "cached_tokens": int(cached[known_cached].sum()) if known_cached.any() else None,
        "goodput_req_per_s": None,
        "ttft_ms": percentiles(ttft[ok]),
        "tpot_ms": percentiles(tpot[ok]),
        "itl_ms": percentiles(cat("itl", np.float64)),
        "e2e_ms": percentiles((end - start)[ok]),
        "by_turn": None,
    }
    if turn.size and turn.max() > 0:  # multi-turn: how the first turns and the later ones fared
        run["by_turn"] = [
            {
                "turn": int(t) + 1,
                "completed": int((ok & (turn == t)).sum()),
                "input_tokens": int(prompt_tokens[known_prompt & (turn == t)].sum()),
                "cached_tokens": int(cached[known_cached & (turn == t)].sum())
                if (known_cached & (turn == t)).any()
                else None,
                "ttft_ms": percentiles(ttft[ok & (turn == t)]),
            }
            for t in range(int(turn.max()) + 1)
        ]
    if a.slo_ttft_ms is not None or a.slo_tpot_ms is not None:
        good = ok.copy()
        if a.slo_ttft_ms is not None:
            good &= ttft * 1000.0 <= a.slo_ttft_ms
        if a.slo_tpot_ms is not None:
            good &= np.isnan(tpot) | (tpot * 1000.0 <= a.slo_tpot_ms)  # one token: no TPOT to miss
        run["goodput_req_per_s"] = float(good.sum()) * per_s
    return run


# ----------------------------------------------------------------------------------------------- reporting


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_table(runs: list[dict], file=None) -> None:
    file = file or sys.stdout
    cols = (
        f"{'load':>10} {'ok':>6} {'fail':>5} {'secs':>7} {'req/s':>7} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'E2E p50':>9} "
        f"{'goodput':>7} {'cached':>6}"
    )
    print(cols + "   (times in ms)", file=file)
    for r in runs:
        load = f"c={r['concurrency']}" if r["concurrency"] is not None else f"r={r['rate']}"
        print(
            f"{load:>10} {r['completed']:>6} {r['failed']:>5} {r['duration_s']:>7.2f} "
            f"{fmt(r['requests_per_s'], 2):>7} {fmt(r['output_tok_per_s'], 0):>10} "
            f"{fmt(r['ttft_ms']['p50']):>9} {fmt(r['ttft_ms']['p99']):>8} "
            f"{fmt(r['tpot_ms']['p50'], 2):>9} {fmt(r['tpot_ms']['p99'], 2):>7} "
            f"{fmt(r['itl_ms']['p50'], 2):>8} {fmt(r['itl_ms']['p99'], 2):>7} {fmt(r['e2e_ms']['p50']):>9} "
            f"{fmt(r['goodput_req_per_s'], 2):>7} {cached_share(r):>6}",
            file=file,
        )
        for t in r.get("by_turn") or ():
            ttft = t["ttft_ms"]
            blank = " " * 51  # under TPOT, ITL, E2E and goodput
            print(
                f"{'turn ' + str(t['turn']):>10} {t['completed']:>6} {'':>5} {'':>7} {'':>7} {'':>10} "
                f"{fmt(ttft['p50']):>9} {fmt(ttft['p99']):>8} {blank} {cached_share(t):>6}",
                file=file,
            )
        for error, count in r["errors"].items():
            print(f"{'':>10} {count} failed: {error}", file=file)


def cached_share(r: dict) -> str:
    """The share of the prompt tokens that the server said were cached, as a percentage."""
    if r.get("cached_tokens") is None or not r.get("input_tokens"):
        return "-"
    return f"{100.0 * r['cached_tokens'] / r['input_tokens']:.0f}%"


def config_of(a: argparse.Namespace) -> dict:
    skip = {"api_key", "command", "func", "out", "plot", "no_progress", "label"}  # the key is a secret
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in skip}
    if config.get("request_rate"):
        config["request_rate"] = ["inf" if r == math.inf else r for r in config["request_rate"]]
    config["api_key_set"] = bool(a.api_key)
    return config


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    check(a, p)
    try:
        convs = build_workload(a, a.num_prompts, a.seed, a.prefix_seed)
        # Single requests, from other prompts than the measured ones (whose prefixes they would cache).
        other = None if a.prefix_seed is None else a.prefix_seed + 1
        warmup = [
            wl.Conversation(c.turns[:1], c.system)
            for c in build_workload(a, a.warmup, a.seed + 1, other)[: a.warmup]
        ]
    except (OSError, ValueError) as e:
        p.error(str(e))
    if a.model is None:
        a.model = first_model(a.base_url, a.api_key)
    base = {"model": a.model, "stream": True, "stream_options": {"include_usage": True}}
    base["temperature"] = a.temperature
    if a.ignore_eos:
        base["ignore_eos"] = True
    loads = (
        [(None, c) for c in a.concurrency]
        if a.concurrency
        else [(r, None) for r in (a.request_rate or [math.inf])]
    )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "label": a.label,
        "config": config_of(a),
        "runs": [],
    }
    print(
        f"# {a.base_url} model={a.model} endpoint={a.endpoint} workload={a.workload} "
        f"requests={sum(len(c.turns) for c in convs)} processes<={a.processes}",
        flush=True,
    )
    for rate, concurrency in loads:
        report["runs"].append(run_once(a, convs, warmup, base, rate, concurrency))
        if a.out:  # after each run, so that a long sweep that is stopped keeps what it measured
            a.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report["runs"])
    if a.plot:
        from minisgl.bench.plot import plot_reports

        plot_reports([(a.label or a.model, report)], a.plot)
    return 0
