"""`minisgl bench offline`: offline throughput through the whole engine (scheduler daemon + worker), started
here through the `LLM` class, with every request of a workload sent at once.

Workloads (issues 3 and 12):
  seed      the seed's offline workload: 16 requests of 32 prompt tokens and 63 output tokens, greedy
  nanovllm  nano-vllm's offline benchmark: 256 requests with input and output lengths uniform in
            [100, 1024] (seed 0), temperature 0.6, ignore_eos
  single    one request of 32 prompt tokens and 63 output tokens, greedy: ms per token, prefill included
  decodeB   B requests (B = 1, 16, 256) of 32 prompt tokens and 257 output tokens, greedy: the decode step
            time through the whole engine, (time of the run - time of a 1-token run) / 256; the 1-token runs
            (the median of three) use other prompts, so the prefix cache does not shorten them
  prefillB  B requests (B = 16) of 32 prompt tokens and one output token, greedy, sent together: one small
            prefill step through the whole engine, from the first send to the last final (the median, and the
            90th percentile, of 20 rounds with prompts of their own after the first)

Prompts are random token ids (as nano-vllm's are), sent as `input_ids`, so the numbers do not depend on the
weights: with `--random-weights` the model is Qwen2.5-0.5B's shapes with random bf16 weights (built on the
GPU: no weights travel), with the tokenizer files of `--tokenizer-dir`. Each engine configuration starts its
own engine and runs every workload after a warm-up request. Output tokens per second count from the first send
to the last final.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DESCRIPTION = __doc__.split("\n\n")[0]

EPILOG = """\
examples:
  minisgl bench offline --tiny                     # a CPU smoke test: a tiny random model, small workloads
  MINISGL_SCHED=target/release/minisgl-sched minisgl bench offline --random-weights --no-overlap-too \\
      --out e2e.json                               # on a GPU
"""

DECODE_BATCHES = (1, 16, 256)
PREFILL_BATCHES = (16,)
PREFILL_ROUNDS = 20
WORKLOADS = (
    "seed",
    "nanovllm",
    "single",
    *(f"decode{b}" for b in DECODE_BATCHES),
    *(f"prefill{b}" for b in PREFILL_BATCHES),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, default=None, help="an HF checkpoint directory (else --random-weights)"
    )
    p.add_argument(
        "--random-weights", action="store_true", help="Qwen2.5-0.5B shapes, random bf16 weights (needs a GPU)"
    )
    p.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="where the random models' tokenizer files come from (default: the default model's directory)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="a tiny random model and small workloads (CPU smoke test)"
    )
    p.add_argument("--no-overlap-too", action="store_true", help="also run with overlap off, for comparison")
    p.add_argument(
        "--engine-flags",
        default="",
        metavar="FLAGS",
        help="`minisgl serve` flags for the engines, one string ('--no-cuda-graphs --max-step-tokens 4096')",
    )
    p.add_argument("--plot", type=Path, default=None, help="draw output tokens/s per workload into this PNG")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU), cpu, cuda, cuda:N")
    p.add_argument("--log-level", default="warn", help="the engine's (info: the scheduler's step summary)")
    p.add_argument(
        "--workloads", default="seed,nanovllm", help=f"which to run, in this order, of {', '.join(WORKLOADS)}"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--label", default=None, help="a name for this engine in the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def workloads(vocab: int = 10000) -> dict[str, list[tuple[list[int], object]]]:
    from minisgl.client import SamplingParams

    rng = np.random.default_rng(0)
    nano = []
    for _ in range(256):
        prompt = rng.integers(0, vocab, int(rng.integers(100, 1025))).tolist()
        out = int(rng.integers(100, 1025))
        nano.append((prompt, SamplingParams(temperature=0.6, max_tokens=out, ignore_eos=True)))

    def greedy(n: int, tokens: int) -> list:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return [(rng.integers(0, vocab, 32).tolist(), params) for _ in range(n)]

    loads = {"seed": greedy(16, 63), "nanovllm": nano, "single": greedy(1, 63)}
    loads |= {f"decode{b}": greedy(b, 257) for b in DECODE_BATCHES}
    return loads | {f"prefill{b}": greedy(b, 1) for b in PREFILL_BATCHES}


def first_token_runs(requests: list, rounds: int = 3, vocab: int = 10000) -> list[list]:
    """`rounds` runs of a workload's shape that stop at the first token, with prompts of their own."""
    rng = np.random.default_rng(1)
    return [
        [(rng.integers(0, vocab, len(p)).tolist(), replace(sp, max_tokens=1)) for p, sp in requests]
        for _ in range(rounds)
    ]


def timed_rounds(llm, runs: list[list]) -> list[float]:
    """Seconds from the first send to the last final of each run, one run after another."""
    from tqdm import tqdm

    seconds = []
    for requests in runs:
        t0 = time.perf_counter()
        generate(llm, requests, tqdm(disable=True))
        seconds.append(time.perf_counter() - t0)
    return seconds


def generate(llm, requests: list, bar) -> list[dict]:
    """`LLM.generate`, but counting each final as it arrives (in any order) on the progress bar."""
    from minisgl.client import MinisglError
    from minisgl.client.llm import prompt_fields

    client = llm.client
    rids = [client.submit(**prompt_fields(p), sampling=sp.to_wire(), stream=False) for p, sp in requests]
    pending, finals = set(rids), {}
    while pending:
        msg = client.recv_any()
        rid = msg.get("rid")
        if rid not in pending:
            continue
        if msg["type"] == "error":
            raise MinisglError(msg["code"], msg["message"], rid)
        if msg["type"] == "final":
            finals[rid] = msg
            pending.discard(rid)
            bar.update(1)
    return [finals[rid] for rid in rids]


def run_engine(model: Path, name: str, engine_args: dict, loads: dict, quiet: bool) -> list[dict]:
    from tqdm import tqdm

    from minisgl.client import LLM, SamplingParams

    runs = []
    started = time.perf_counter()
    with LLM(str(model), **engine_args) as llm:  # a private socket, no HTTP: runs beside a server
        startup = time.perf_counter() - started
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        for load, requests in loads.items():
            with tqdm(total=len(requests), desc=f"{name} {load}", file=sys.stderr, disable=quiet) as bar:
                t0 = time.perf_counter()
                finals = generate(llm, requests, bar)
                seconds = time.perf_counter() - t0
            tokens = sum(len(f["token_ids"]) for f in finals)
            short = [
                f for f, (_, sp) in zip(finals, requests, strict=True) if len(f["token_ids"]) != sp.max_tokens
            ]
            if short:  # ignore_eos: anything else is a bug, and the throughput would not compare
                raise RuntimeError(f"{name} {load}: {len(short)} requests ended before max_tokens")
            run = {
                "engine": name,
                "workload": load,
                "requests": len(finals),
                "output_tokens": tokens,
                "seconds": seconds,
                "output_tok_per_s": tokens / seconds,
                "requests_per_s": len(finals) / seconds,
                "startup_s": startup,
            }
            max_tokens = requests[0][1].max_tokens
            if load == "single":
                run["ms_per_token"] = 1e3 * seconds / max_tokens
            if load.startswith("decode"):
                run["first_token_s"] = statistics.median(timed_rounds(llm, first_token_runs(requests)))
                run["step_ms"] = 1e3 * (seconds - run["first_token_s"]) / (max_tokens - 1)
            if load.startswith("prefill"):
                rounds = sorted(timed_rounds(llm, first_token_runs(requests, PREFILL_ROUNDS)))
                run["prefill_ms"] = 1e3 * statistics.median(rounds)
                run["prefill_ms_p90"] = 1e3 * rounds[int(0.9 * (len(rounds) - 1))]
            runs.append(run)
    return runs


def engine_flags(flags: str) -> dict:
    """The EngineConfig fields that `minisgl serve` FLAGS set to other than their defaults, as keyword
    arguments of `LLM`."""
    import shlex

    from minisgl.launch import build_parser

    parser = build_parser("--engine-flags")
    given, default = vars(parser.parse_args(shlex.split(flags))), vars(parser.parse_args([]))
    return {k: v for k, v in given.items() if v != default[k] and k not in ("model", "model_dir")}


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from minisgl.bench import random_model
    from minisgl.launch import DEFAULT_MODEL

    names = a.workloads.split(",")
    if unknown := [n for n in names if n not in WORKLOADS]:
        p.error(f"unknown workloads {unknown}: choose from {', '.join(WORKLOADS)}")
    if a.model is None and not (a.random_weights or a.tiny):
        p.error("name a --model, or use --random-weights (GPU) or --tiny (CPU)")
    every = workloads()
    loads = {name: every[name] for name in names}
    if a.tiny:
        loads = {
            k: [(pr[:40], replace(sp, max_tokens=min(sp.max_tokens, 8))) for pr, sp in reqs[:8]]
            for k, reqs in loads.items()
        }
    engines = {"overlap": {}}
    if a.no_overlap_too:
        engines["no overlap"] = {"overlap": False}
    tokenizer_dir = a.tokenizer_dir or DEFAULT_MODEL
    try:
        flags = engine_flags(a.engine_flags)
    except SystemExit:  # argparse has said what is wrong with them
        p.error(f"--engine-flags {a.engine_flags!r}: not flags of `minisgl serve`")
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            model = Path(tmp) / "model"
            if a.tiny:
                random_model.make_tiny_model(model)
            else:
                random_model.make_model(model, seed=0, init_std=0.02)
            random_model.copy_tokenizer(tokenizer_dir, model)
        described = (
            str(a.model)
            if a.model
            else "a tiny random Qwen2 (--tiny)"
            if a.tiny
            else "Qwen2.5-0.5B shapes, random bf16 weights (seed 0)"
        )
        engine_args = {
            name: {"device": a.device, "log_level": a.log_level, **flags, **args}
            for name, args in engines.items()
        }
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "label": a.label,
            "config": {"model": described, "workloads": names, "tiny": a.tiny, "engines": engine_args},
            "runs": [],
        }
        for name, args in engine_args.items():
            report["runs"] += run_engine(model, name, args, loads, a.no_progress)
            if a.out:
                a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# {report['date']}  {described}")
    print(
        f"{'engine':<12} {'workload':<10} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10}"
        "  ms/token, ms/step or ms/prefill"
    )
    for r in report["runs"]:
        per = r.get("ms_per_token", r.get("step_ms", r.get("prefill_ms")))
        print(
            f"{r['engine']:<12} {r['workload']:<10} {r['requests']:>8} {r['output_tokens']:>10} "
            f"{r['seconds']:>8.3f} {r['output_tok_per_s']:>10.0f}{'' if per is None else f'  {per:.3f}'}"
        )
    if a.plot:
        from minisgl.bench.plot import plot_offline

        plot_offline([(a.label or "minisgl", report)], a.plot)
    return 0
