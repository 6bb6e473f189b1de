#!/usr/bin/env python3
"""GPU benchmark of the worker on a model family's shapes with random weights (Qwen2.5-0.5B's by default).

Builds the model itself (no weights travel), then drives `ModelRunner` directly with synthetic steps:
- correctness: greedy tokens and first-step logits against HF transformers (bf16, sdpa) on the same weights;
- decode step time at several batch sizes, for each configuration (backend, graphs, fused kernels), one step
  at a time (launch, wait, next) and through the overlapped loop with every step already published;
- GPU idle time between steps, from CUDA events around each step, and a profile of where the time goes;
- with --sampling-options, decode step time with logit bias, penalties, min_p and logprobs on every request,
  on one request of the batch, and on none;
- with --masks BATCH:C1,C2,..., decode step time at that batch with C constrained requests (a token mask each,
  as structured output sends them), in one run: the worker's cost of the grammar path (the scheduler's mask
  threads run beside the steps, and are not timed here).

    python scripts/bench_gpu.py --out bench.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py"), str(ROOT / "worker_py" / "tests")]

from fake_steps import Join, ReadySteps, StepBuilder  # noqa: E402

from minisgl.bench.random_model import SHAPES, make_model  # noqa: E402
from minisgl.worker.config import WorkerConfig  # noqa: E402
from minisgl.worker.loop import run_steps  # noqa: E402
from minisgl.worker.runner import ModelRunner  # noqa: E402

PAGE_SIZE = 16
MAX_BATCH = 256
MAX_TOKENS = 8192
# Worker settings (WorkerConfig fields) compared. `default` is what `minisgl serve` runs on a GPU.
CONFIGS = {
    "torch": {"attention": "torch", "cuda_graphs": False, "fused_kernels": False},
    "flashinfer": {"attention": "flashinfer", "decode_attention": "flashinfer", "cuda_graphs": False},
    # FlashInfer's decode kernel in graphs, with our fused kernels.
    "flashinfer+graphs+fused": {"attention": "flashinfer", "decode_attention": "flashinfer"},
    # Our Triton decode attention, graphs, fused kernels and small-batch projections.
    "default": {},
    # The same, with the sampling run eagerly after each replayed graph (the default before 2026-12-06).
    "eager_sampling": {"graph_sampling": False},
    # small_m's programs ask for their own weight tiles into L2 before waiting (graphs of up to 16 rows).
    "prefetch_weights": {"prefetch_weights": True},
    # Decode graphs planned for 128-token contexts: one attention kernel, no split, no combine.
    "short_context": {"decode_graph_context": 128},
    # The default's decode graphs, and twins of those of up to 16 rows planned for 128-token contexts,
    # replayed for the steps whose contexts are all that short.
    "short_twins": {"short_graph_context": 128},
    # The same, with every extend step run eagerly (the default before 2026-12-06).
    "eager_extend": {"extend_graphs": False},
    # The same, without programmatic dependent launch in the small graphs (the default before 2026-12-07).
    "no_pdl": {"pdl": False},
    # The same, with extend steps past the token-row graphs replayed from extend graphs (off by default).
    "extend_graphs": {"extend_graph_tokens": 8192},
    # The same, with the small extend steps in the extend graphs too, not as one decode row per token.
    "no_token_rows": {"token_graph_tokens": 0},
    # Our Triton kernels for every step's attention, eager extend steps included: no FlashInfer.
    "triton_attention": {"attention": "triton"},
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def worker_config(model_dir: Path, num_pages: int | None, **settings) -> WorkerConfig:
    fields = {"page_size": PAGE_SIZE, "max_batch": MAX_BATCH, "max_step_tokens": MAX_TOKENS} | settings
    return WorkerConfig(model=str(model_dir), device="cuda", dtype="bfloat16", num_pages=num_pages, **fields)


def new_runner(model_dir: Path, config: str, num_pages: int | None = 8192) -> ModelRunner:
    return ModelRunner(worker_config(model_dir, num_pages, **CONFIGS[config]), show_progress=False)


def vocab_size(model_dir) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def free_memory() -> None:
    """Returns what dropped runners held to the driver, so the next one sizes its KV cache from it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- correctness


def correctness(model_dir: Path, configs: list[str], prompts: int, prompt_len: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size(model_dir), (prompts, prompt_len))
    inp = torch.from_numpy(ids).cuda()
    ref = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").cuda()
        with torch.no_grad():
            logits = hf(inp).logits[:, -1].float()
            gen = hf.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        ref[dtype] = (logits, gen[:, prompt_len:].cpu().numpy())
        del hf
        free_memory()
    hf_logits, hf_tokens = ref[torch.bfloat16]
    fp32_logits, fp32_tokens = ref[torch.float32]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    out = {
        # How far bf16 itself is from float32 on this model: the scale on which bf16 implementations differ.
        "hf bf16 vs hf fp32": {
            "logits_rel_err": rel(hf_logits, fp32_logits),
            "token_agreement": float((hf_tokens == fp32_tokens).mean()),
        }
    }
    for config in ["torch fp32", *configs]:
        runner = None
        try:
            if config == "torch fp32":  # our code in float32 against HF in float32: is the model right?
                cfg = worker_config(model_dir, 2048, max_batch=16, max_step_tokens=2048, **CONFIGS["torch"])
                runner = ModelRunner(replace(cfg, dtype="float32"), show_progress=False)
            else:
                runner = new_runner(model_dir, config, num_pages=None if config == configs[-1] else 2048)
            slots = list(range(prompts))
            reqs = [(s, ids[s].tolist()) for s in slots]
            logits = runner.forward_logits(StepBuilder(runner.num_pages, PAGE_SIZE).extend(reqs)).float()
            b = StepBuilder(runner.num_pages, PAGE_SIZE, seed=1)
            tokens = [runner.run_step(b.extend(reqs, [Join(s) for s in slots])).numpy()]
            for _ in range(new_tokens - 1):
                tokens.append(runner.run_step(b.decode(slots)).numpy())
            ours = np.stack(tokens, axis=1)
            want_logits, want_tokens = (
                (fp32_logits, fp32_tokens) if "fp32" in config else (hf_logits, hf_tokens)
            )
            same = ours == want_tokens
            out[config] = {
                "logits_rel_err": rel(logits, want_logits),
                "logits_rel_err_vs_fp32": rel(logits, fp32_logits),
                "logits_rel_err_max_row": ((logits - want_logits).norm(dim=1) / want_logits.norm(dim=1))
                .max()
                .item(),
                "token_agreement": float(same.mean()),
                "prompts_identical": int(same.all(axis=1).sum()),
                "first_divergence": [int(np.argmin(row)) if not row.all() else None for row in same],
                "num_pages": runner.num_pages,
                "kv_gib": runner.kv_cache.nbytes / 2**30,
            }
        except Exception:
            out[config] = {"error": traceback.format_exc()}
            log(out[config]["error"])
        runner = None
        free_memory()
    return out


# ---------------------------------------------------------------------------------------------- decode timing


class StepEvents:
    """Wraps `runner.launch` to record a CUDA event where each step's device work starts and ends."""

    def __init__(self, runner: ModelRunner) -> None:
        self.pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        real = runner.launch

        self.host: list[float] = []

        def launch(step):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            handle = real(step)
            end.record()
            self.host.append(time.perf_counter() - t0)
            self.pairs.append((start, end))
            return handle

        runner.launch = launch

    def summary(self, skip: int) -> dict:
        torch.cuda.synchronize()
        pairs = self.pairs[skip:]
        busy = [s.elapsed_time(e) for s, e in pairs]
        gaps = [pairs[i][1].elapsed_time(pairs[i + 1][0]) for i in range(len(pairs) - 1)]
        span = pairs[0][0].elapsed_time(pairs[-1][1])
        return {
            "gpu_step_ms": statistics.median(busy),
            "idle_between_steps_frac": max(0.0, sum(gaps)) / span,
            "span_ms_per_step": span / len(pairs),
            "host_launch_ms": 1e3 * statistics.median(self.host[skip:]),
        }


def prefill_and_steps(
    runner: ModelRunner, batch: int, prompt_len: int, steps: int, seed: int, join=Join
) -> list:
    """Prefills `batch` requests (joining as `join(slot)` says), then returns `steps` decode steps of them."""
    rng = np.random.default_rng(seed)
    b = StepBuilder(runner.num_pages, PAGE_SIZE, seed=seed)
    slots = list(range(batch))
    reqs = [(s, rng.integers(0, vocab_size(runner.config.model), prompt_len).tolist()) for s in slots]
    runner.run_step(b.extend(reqs, [join(s) for s in slots]))
    return [b.decode(slots) for _ in range(steps)]


# Sampling options compared by --sampling-options: name -> the join of slot s.
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
OPTIONS = {
    "greedy": lambda s: Join(s),
    "temperature": lambda s: Join(s, seed=s, temperature=SAMPLED["temperature"]),
    "none": lambda s: Join(s, seed=s, **SAMPLED),
    "penalties": lambda s: Join(
        s, seed=s, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, **SAMPLED
    ),
    "bias300": lambda s: Join(s, seed=s, bias=tuple((i * 7 + s, 0.5) for i in range(300)), **SAMPLED),
    "min_p": lambda s: Join(s, seed=s, min_p=0.05, **SAMPLED),
    "logprobs20": lambda s: Join(s, seed=s, logprobs=20, **SAMPLED),
    "all": lambda s: Join(
        s,
        seed=s,
        presence_penalty=0.5,
        repetition_penalty=1.1,
        min_p=0.05,
        logprobs=5,
        bias=((s, 1.0),),
        **SAMPLED,
    ),
    "all_on_one": lambda s: OPTIONS["all"](s) if s == 0 else OPTIONS["none"](s),
}


def overlapped(runner: ModelRunner, decode: list, warm: int) -> tuple[dict, list]:
    """The steps through the overlapped loop (step N+1 launched before N is awaited, as the worker serves),
    all ready: the loop's step time (median after `warm` steps) with StepEvents' summary (the GPU's busy time
    per step, idle share, host time in launch()), and each step's (id, tokens)."""
    ring = ReadySteps(decode)
    events = StepEvents(runner)
    run_steps(runner, ring, ring, overlap=True)
    del runner.launch  # back to the class's method
    row = {"overlap_ms": 1e3 * float(np.median(np.diff(ring.times)[warm:]))} | events.summary(warm)
    return row, ring.results


def time_sampling_options(
    model_dir: Path, config: str, batches: list[int], prompt_len: int, steps: int, warm: int
) -> dict:
    """Decode steps through the overlapped loop, for each set of sampling options: step time as the loop sees
    it and the GPU's busy time per step."""
    runner = new_runner(model_dir, config)
    out = {}
    for batch in batches:
        for name, join in OPTIONS.items():
            decode = prefill_and_steps(runner, batch, prompt_len, steps, seed=batch, join=join)
            row = out[f"{name} b{batch}"] = overlapped(runner, decode, warm)[0]
            log(f"  {config} {name} batch {batch}: {row}")
    return out


def parse_masks(spec: str) -> tuple[int, list[int]]:
    """`BATCH:C1,C2,...` -> (batch, [counts]); each count at most the batch."""
    batch, _, counts = spec.partition(":")
    b, cs = int(batch), [int(c) for c in counts.split(",") if c]
    if not cs or any(not 0 <= c <= b for c in cs):
        raise ValueError(f"--masks wants BATCH:C1,C2,... with 0 <= C <= BATCH, got {spec!r}")
    return b, cs


def random_masks(count: int, vocab: int, seed: int, allowed: float = 0.1) -> np.ndarray:
    """`count` masks (uint32, count * W words) each allowing about `allowed` of the vocabulary."""
    rng = np.random.default_rng(seed)
    words = -(-vocab // 32)
    bits = rng.random((count, words * 32)) < allowed
    return (
        np.packbits(bits.reshape(count, words, 32)[:, :, ::-1], axis=-1, bitorder="big")
        .view(">u4")
        .astype(np.uint32)
        .reshape(-1)
    )


def with_masks(step, constrained: int, bits: np.ndarray):
    """The step with a token mask for its first `constrained` requests (`mask_row`, `mask_bits`)."""
    n = len(step.req_slot)
    row = np.full(n, -1, np.int32)
    row[:constrained] = np.arange(constrained, dtype=np.int32)
    step.mask_row = row
    words = len(bits) // max(1, constrained) if constrained else 0
    step.mask_bits = bits[: constrained * words] if constrained else np.zeros(0, np.uint32)
    return step


def time_masks(
    model_dir: Path, config: str, batch: int, counts: list[int], prompt_len: int, steps: int, warm: int
) -> dict:
    """Decode steps through the overlapped loop with 0, C1, C2... masked requests of `batch`."""
    runner = new_runner(model_dir, config)
    vocab = vocab_size(model_dir)
    out = {}
    for count in counts:
        bits = random_masks(count, vocab, seed=count)
        decode = prefill_and_steps(runner, batch, prompt_len, steps, seed=batch, join=OPTIONS["none"])
        decode = [with_masks(step, count, bits) for step in decode]
        row = out[f"b{batch} masked{count}"] = overlapped(runner, decode, warm)[0]
        log(f"  {config} batch {batch}, {count} masked: {row}")
    base = out[f"b{batch} masked{counts[0]}"]["gpu_step_ms"]
    for row in out.values():
        row["gpu_vs_first"] = row["gpu_step_ms"] / base
    return out


def time_decode(
    model_dir: Path, config: str, batches: list[int], prompt_len: int, steps: int, warm: int
) -> dict:
    runner = new_runner(model_dir, config)
    out = {"graphs": runner.graphs is not None, "fused": runner.fused_kernels}
    for batch in batches:
        row = {}
        # One step at a time: the host launches, waits for the ids, then launches the next.
        decode = prefill_and_steps(runner, batch, prompt_len, steps, seed=batch)
        times, seq_tokens = [], []
        for step in decode:
            t0 = time.perf_counter()
            seq_tokens.append(runner.run_step(step).numpy())
            times.append(time.perf_counter() - t0)
        row["sync_ms"] = 1e3 * statistics.median(times[warm:])
        decode = prefill_and_steps(runner, batch, prompt_len, steps, seed=batch)
        summary, results = overlapped(runner, decode, warm)
        row |= summary
        row["overlap_tokens_equal"] = all(
            np.array_equal(a, b) for (_, a), b in zip(results, seq_tokens, strict=True)
        )
        out[batch] = row
        log(f"  {config} batch {batch}: {row}")
    return out


# ----------------------------------------------------------------------------------- prefill, long contexts


def kernel_table(run, steps: int, top: int = 12) -> dict:
    """Kernel time per call of `run()`, by kernel name, from the torch profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    by_name: Counter = Counter()
    count = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:80]] += e.device_time
            count += 1
    return {
        "kernels_per_call": count / steps,
        "kernel_us_per_call": sum(by_name.values()) / steps,
        "top_kernels_us_per_call": {k: round(v / steps, 1) for k, v in by_name.most_common(top)},
    }


def time_prefill(model_dir: Path, config: str, shapes: list[tuple[int, int]], reps: int = 5) -> dict:
    """One extend step of `reqs` fresh prompts of `length` tokens each, timed with CUDA events."""
    runner = new_runner(model_dir, config)
    rng = np.random.default_rng(0)
    out = {}
    for reqs, length in shapes:
        b = StepBuilder(runner.num_pages, PAGE_SIZE, seed=reqs)
        slots = list(range(reqs))

        def one(b=b, slots=slots, length=length) -> None:
            prompts = [(s, rng.integers(0, vocab_size(runner.config.model), length).tolist()) for s in slots]
            runner.run_step(b.extend(prompts, [Join(s) for s in slots]))
            for s in slots:
                b.release(s)

        one()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            one()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        row = {"ms": ms, "tokens_per_s": reqs * length / ms * 1e3, **kernel_table(one, 2)}
        out[f"{reqs}x{length}"] = row
        log(f"  {config} prefill {reqs}x{length}: {row}")
    runner = None
    free_memory()
    return out


def launch_host(runner: ModelRunner, timed: list, profiled: list, top: int) -> tuple[list[float], str]:
    """Host seconds in `launch` of each of the `timed` steps (run one at a time, the device idle at each
    launch), and cProfile's `top` functions by own time over the `profiled` steps' launches and collects."""
    import cProfile
    import io
    import pstats

    host = []
    with timed_parts(runner) as parts:
        for step in timed:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = runner.launch(step)
            host.append(time.perf_counter() - t0)
            runner.collect(handle)
    prof = cProfile.Profile()
    prof.enable()
    for step in profiled:
        runner.collect(runner.launch(step))
    prof.disable()
    text = io.StringIO()
    # By own time (which calls are slow), then by inclusive time (which parts of launch() are: the upload, the
    # graph choice, the forward, the joins, the sampling).
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(r"minisgl", top)
    share = ", ".join(f"{name} {1e3 * sum(t) / len(timed):.3f}" for name, t in parts.items())
    return host, f"ms a launch in its parts (no profiler): {share}\n" + text.getvalue()


def replay_timeline(runner: ModelRunner, steps: list) -> dict:
    """Medians over `steps`, each launched on an idle device and collected: ms of host time in `launch()`
    before its graph is replayed (`to_replay_ms`), GPU ms from the replay to the end of everything the launch
    queued (`gpu_ms`), and ms from the launch to the collected result (`wall_ms`). Eager steps replay
    nothing: their `to_replay_ms` and `gpu_ms` are left out."""
    graphs = runner.graphs
    seen: list[tuple[float, torch.cuda.Event]] = []

    def hooked(fn):
        def run(*args, **kwargs):
            if not seen:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                seen.append((time.perf_counter(), event))
            return fn(*args, **kwargs)

        return run

    names = ("replay", "replay_hidden", "replay_extend")
    for name in names if graphs is not None else ():
        setattr(graphs, name, hooked(getattr(graphs, name)))
    to_replay, gpu, wall = [], [], []
    try:
        for step in steps:
            seen.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = runner.launch(step)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            runner.collect(handle)
            wall.append(time.perf_counter() - t0)
            end.synchronize()
            if seen:
                to_replay.append(seen[0][0] - t0)
                gpu.append(seen[0][1].elapsed_time(end) / 1e3)
    finally:
        for name in names if graphs is not None else ():
            delattr(graphs, name)
    times = {"to_replay_ms": to_replay, "gpu_ms": gpu, "wall_ms": wall}
    return {k: round(1e3 * statistics.median(v), 3) for k, v in times.items() if v}


@contextlib.contextmanager
def timed_parts(runner: ModelRunner):
    """Times the parts of `launch()` (the runner's methods it calls, in order), wall clock and no profiler:
    {part: [seconds per call]}."""
    parts = {
        "graph_for": (runner, "_graph_for"),
        "upload": (runner.uploader, "upload"),
        "queue_forward": (runner, "_queue_forward"),
        "joins": (runner, "_apply_joins"),
        "sampling_plan": (runner.sampler, "plan_for"),
    }
    times = {name: [] for name in parts}

    def timed(name, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name].append(time.perf_counter() - t0)

        return run

    for name, (owner, attr) in parts.items():
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        yield times
    finally:
        for owner, attr in parts.values():
            delattr(owner, attr)  # the instance attribute goes; the class's method is back


def prefill_host(model_dir: Path, config: str, shapes: list[tuple[int, int]], reps: int = 20) -> dict:
    """Host time of `launch` for small extend steps (the GPU work is a fraction of it), and a Python profile
    of a few launches: where an eager prefill's host time goes."""
    runner = new_runner(model_dir, config)
    rng = np.random.default_rng(0)
    out = {}
    for reqs, length in shapes:
        b = StepBuilder(runner.num_pages, PAGE_SIZE, seed=reqs)
        slots = list(range(reqs))
        steps = []
        for _ in range(reps + 1):
            prompts = [(s, rng.integers(0, vocab_size(runner.config.model), length).tolist()) for s in slots]
            steps.append(b.extend(prompts, [Join(s) for s in slots]))
            for s in slots:
                b.release(s)
        runner.collect(runner.launch(steps[0]))
        host, text = launch_host(runner, steps[1:], steps[1:4], top=18)
        timeline = replay_timeline(runner, steps[1:])
        host_ms = 1e3 * statistics.median(host)
        out[f"{reqs}x{length}"] = {"host_launch_ms": host_ms, "profile": text, **timeline}
        log(f"  {config} prefill host {reqs}x{length}: {host_ms:.2f} ms; {timeline}")
        log(text)
    runner = None
    free_memory()
    return out


def decode_host(model_dir: Path, config: str, batches: list[int], steps: int = 64) -> dict:
    """Host time of `launch` for decode steps, greedy and sampled (temperature + top_p), and a Python profile
    of their launches: where a small decode step's host path goes (issue 12 asks <= 0.15 ms at batch 1)."""
    runner = new_runner(model_dir, config)
    out = {}
    for batch in batches:
        for name in ("greedy", "none"):
            decode = prefill_and_steps(runner, batch, 16, steps, seed=batch, join=OPTIONS[name])
            host, text = launch_host(runner, decode[: steps // 2], decode[steps // 2 :], top=25)
            key = f"{name} b{batch}"
            out[key] = {"host_launch_ms": 1e3 * statistics.median(host[4:]), "profile": text}
            log(f"  {config} decode host {key}: {out[key]['host_launch_ms']:.3f} ms")
            log(text)
    runner = None
    free_memory()
    return out


def fill(runner: ModelRunner, b: StepBuilder, lengths: list[int], rng) -> list[int]:
    """Prefills one request per length in extend steps of at most MAX_TOKENS tokens; returns the slots."""
    chunk: list = []
    for slot, n in enumerate(lengths):
        if chunk and sum(len(ids) for _, ids in chunk) + n > MAX_TOKENS:
            runner.run_step(b.extend(chunk, [Join(s) for s, _ in chunk]))
            chunk = []
        chunk.append((slot, rng.integers(0, vocab_size(runner.config.model), n).tolist()))
    runner.run_step(b.extend(chunk, [Join(s) for s, _ in chunk]))
    return list(range(len(lengths)))


def time_long_decode(
    model_dir: Path, config: str, batch: int, lo: int, hi: int, steps: int, warm: int
) -> dict:
    """Decode steps over contexts drawn uniformly from [lo, hi] (seed 0), as in the nano-vllm workload's
    middle, through the overlapped loop; plus the kernels of one step."""
    runner = new_runner(model_dir, config, num_pages=None)
    rng = np.random.default_rng(0)
    b = StepBuilder(runner.num_pages, PAGE_SIZE, seed=1)
    lengths = rng.integers(lo, hi + 1, batch).tolist()
    slots = fill(runner, b, lengths, rng)
    row = {
        "mean_context": float(np.mean(lengths)),
        **overlapped(runner, [b.decode(slots) for _ in range(steps)], warm)[0],
        **kernel_table(lambda: runner.run_step(b.decode(slots)), 4),
    }
    log(f"  {config} long decode b{batch} [{lo}, {hi}]: {row}")
    runner = None
    free_memory()
    return row


# ---------------------------------------------------------------------------------------------- profile


def profile(model_dir: Path, config: str, batch: int, prompt_len: int, steps: int, trace_dir: Path) -> dict:
    """Device activity over `steps` overlapped decode steps: idle fraction, the kernels that take the time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner = new_runner(model_dir, config)
    decode = prefill_and_steps(runner, batch, prompt_len, steps + 8, seed=7)
    ring = ReadySteps(decode[:8])
    run_steps(runner, ring, ring, overlap=True)  # warm
    ring = ReadySteps(decode[8:])
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps(runner, ring, ring, overlap=True)
        torch.cuda.synchronize()
    trace = trace_dir / f"trace_{config}_b{batch}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    device.sort(key=lambda e: e["ts"])
    start, end = device[0]["ts"], max(e["ts"] + e["dur"] for e in device)
    busy, cur_s, cur_e = 0.0, None, None
    short_gaps = long_gaps = 0.0  # idle stretches under and over 5 us: launch latency vs waiting for the host
    for e in device:
        s, t = e["ts"], e["ts"] + e["dur"]
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gap = s - cur_e
                short_gaps += gap if gap < 5 else 0
                long_gaps += gap if gap >= 5 else 0
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    busy += cur_e - cur_s
    runner = None
    free_memory()
    kernels = [e for e in device if e["cat"] == "kernel"]
    by_name: Counter = Counter()
    for e in kernels:
        by_name[e["name"][:80]] += e["dur"]
    return {
        "steps": steps,
        "wall_us_per_step": (end - start) / steps,
        "busy_us_per_step": busy / steps,
        "idle_frac": 1 - busy / (end - start),
        "idle_us_per_step_in_gaps_under_5us": short_gaps / steps,
        "idle_us_per_step_in_gaps_over_5us": long_gaps / steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": sum(e["dur"] for e in kernels) / steps,
        "top_kernels_us_per_step": {k: round(v / steps, 2) for k, v in by_name.most_common(20)},
    }


# ---------------------------------------------------------------------------------------------- main


def table(results: dict, batches: list[int]) -> str:
    lines = [
        f"# {results['date']}  {results['device']}  torch {results['torch']}  "
        f"flashinfer {results['flashinfer']}",
        "## correctness: 16 prompts x 64 random tokens, first-step logits and 32 greedy tokens, against HF",
        '## transformers (sdpa) in bf16 ("torch fp32": our code in float32 against HF in float32)',
        f"{'config':<26}{'logits rel err':>15}{'vs fp32':>9}{'agreement':>11}{'identical':>10}"
        "  first divergence",
    ]
    for name, c in results["correctness"].items():
        if "error" in c:
            lines.append(f"{name:<26} ERROR {c['error'].splitlines()[-1]}")
        elif "first_divergence" not in c:
            lines.append(f"{name:<26}{c['logits_rel_err']:>15.2e}{'':>9}{c['token_agreement']:>11.3f}")
        else:
            lines.append(
                f"{name:<26}{c['logits_rel_err']:>15.2e}{c['logits_rel_err_vs_fp32']:>9.2e}"
                f"{c['token_agreement']:>11.3f}{c['prompts_identical']:>7}/16  {c['first_divergence']}"
            )
    lines += [
        "## decode step time, ms (median): sync = one step at a time; overlap = the worker loop with",
        "## the next step always ready; gpu = CUDA events around each step's device work; host = host",
        "## time in launch(); idle = GPU idle between steps / wall time, in the overlapped loop",
        f"{'config':<26}{'batch':>6}{'sync':>9}{'overlap':>9}{'gpu':>9}{'host':>8}{'idle':>8}  tokens equal",
    ]
    for name, per_batch in results["decode"].items():
        if "error" in per_batch:
            lines.append(f"{name:<26} ERROR {per_batch['error'].splitlines()[-1]}")
            continue
        for b in batches:
            r = per_batch[b]
            lines.append(
                f"{name:<26}{b:>6}{r['sync_ms']:>9.3f}{r['overlap_ms']:>9.3f}{r['gpu_step_ms']:>9.3f}"
                f"{r['host_launch_ms']:>8.3f}{100 * r['idle_between_steps_frac']:>7.1f}%"
                f"  {r['overlap_tokens_equal']}"
            )
    for section in ("prefill", "long_decode"):
        for name, rows in results.get(section, {}).items():
            rows = {"": rows} if section == "long_decode" else rows
            for shape, r in rows.items():
                head = f"## {section} {name} {shape}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float) and "kernel" not in k
                )
                lines.append(
                    head + f", {r['kernels_per_call']:.0f} kernels, {r['kernel_us_per_call']:.0f} us"
                )
                top = list(r["top_kernels_us_per_call"].items())[:12]
                lines += [f"    {v:>8.1f} us  {k}" for k, v in top]
    lines.append("## profile (torch profiler, overlapped loop), per step")
    for name, p in results["profile"].items():
        if "error" in p:
            lines.append(f"{name:<32} ERROR {p['error'].splitlines()[-1]}")
            continue
        lines += [
            f"{name:<32} wall {p['wall_us_per_step']:.0f} us, device busy {p['busy_us_per_step']:.0f} us "
            f"(idle {100 * p['idle_frac']:.1f}%), {p['kernels_per_step']:.0f} kernels, "
            f"{p['kernel_us_per_step']:.0f} us",
            f"{'':<32} idle in gaps < 5 us: {p['idle_us_per_step_in_gaps_under_5us']:.0f} us, "
            f">= 5 us: {p['idle_us_per_step_in_gaps_over_5us']:.0f} us",
        ]
        lines += [f"    {v:>8.1f} us  {k}" for k, v in list(p["top_kernels_us_per_step"].items())[:20]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_gpu.json", help="where the JSON results go")
    p.add_argument("--model-dir", default=None, help="reuse a model directory (default: build one)")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=SHAPES, help="the random model's shape")
    p.add_argument("--batches", default="1,8,16,64,256")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=256, help="decode steps per batch size")
    p.add_argument("--warmup", type=int, default=16, help="steps left out of the medians")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (HF's default)")
    p.add_argument("--profile-batches", default="1,256")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--prefill", default="", help="extend steps to time, as REQSxLEN,... e.g. 16x512,2x4096")
    p.add_argument("--long-decode", default="", help="BATCH:LO:HI, e.g. 128:100:2048 (contexts uniform)")
    p.add_argument(
        "--prefill-host", default="", help="extend steps whose launch() to profile, e.g. 1x32,16x32"
    )
    p.add_argument(
        "--decode-host", default="", help="batch sizes whose decode launch() to profile, e.g. 1,16"
    )
    p.add_argument(
        "--sampling-options", default="", help="batch sizes at which to time decode with sampling options"
    )
    p.add_argument(
        "--masks", default="", help="BATCH:C1,C2,...: decode with C token-masked requests, e.g. 64:0,8,64"
    )
    a = p.parse_args()
    masks_spec = parse_masks(a.masks) if a.masks else None
    batches = [int(x) for x in a.batches.split(",")]
    configs = a.configs.split(",")
    out_path = Path(a.out)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "flashinfer": _version("flashinfer"),
        "command": " ".join(sys.argv),
        "correctness": {},
        "decode": {},
        "profile": {},
    }

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=1, default=str))

    model_dir = Path(a.model_dir) if a.model_dir else Path(tempfile.mkdtemp(prefix="qwen05b_random_"))
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        make_model(model_dir, seed=0, init_std=a.init_std, shape=a.shape)
        log(f"built the random model in {time.perf_counter() - t0:.1f} s")
    if not a.skip_correctness:
        t0 = time.perf_counter()
        results["correctness"] = correctness(model_dir, configs, prompts=16, prompt_len=64, new_tokens=32)
        log(f"correctness in {time.perf_counter() - t0:.1f} s: {results['correctness']}")
        save()
    for config in configs if not a.skip_decode else []:
        t0 = time.perf_counter()
        try:
            results["decode"][config] = time_decode(
                model_dir, config, batches, a.prompt_len, a.steps, a.warmup
            )
        except Exception:
            results["decode"][config] = {"error": traceback.format_exc()}
            log(results["decode"][config]["error"])
        free_memory()
        log(f"{config} timed in {time.perf_counter() - t0:.1f} s")
        save()
    for config in configs[-1:]:
        for b in (int(x) for x in a.profile_batches.split(",") if x):
            try:
                results["profile"][f"{config} b{b}"] = profile(
                    model_dir, config, b, a.prompt_len, 64, Path(tempfile.mkdtemp(prefix="traces_"))
                )
            except Exception:
                results["profile"][f"{config} b{b}"] = {"error": traceback.format_exc()}
                log(results["profile"][f"{config} b{b}"]["error"])
            save()
    for config in configs[-1:] if a.sampling_options else []:
        batches_options = [int(x) for x in a.sampling_options.split(",")]
        try:
            results["sampling_options"] = time_sampling_options(
                model_dir, config, batches_options, a.prompt_len, a.steps, a.warmup
            )
        except Exception:
            results.setdefault("errors", {})["sampling_options"] = traceback.format_exc()
            log(results["errors"]["sampling_options"])
        free_memory()
        save()
    for config in configs[-1:] if masks_spec else []:
        try:
            results["masks"] = time_masks(model_dir, config, *masks_spec, a.prompt_len, a.steps, a.warmup)
        except Exception:
            results.setdefault("errors", {})["masks"] = traceback.format_exc()
            log(results["errors"]["masks"])
        free_memory()
        save()
    for config in configs if a.decode_host else []:
        try:
            batches_host = [int(x) for x in a.decode_host.split(",")]
            results.setdefault("decode_host", {})[config] = decode_host(model_dir, config, batches_host)
        except Exception:
            results.setdefault("errors", {})["decode_host"] = traceback.format_exc()
            log(results["errors"]["decode_host"])
        free_memory()
        save()
    for config in configs if a.prefill or a.long_decode or a.prefill_host else []:
        try:
            if a.prefill_host:
                shapes = [tuple(int(v) for v in x.split("x")) for x in a.prefill_host.split(",")]
                results.setdefault("prefill_host", {})[config] = prefill_host(model_dir, config, shapes)
            if a.prefill:
                shapes = [tuple(int(v) for v in x.split("x")) for x in a.prefill.split(",")]
                results.setdefault("prefill", {})[config] = time_prefill(model_dir, config, shapes)
            if a.long_decode:
                batch, lo, hi = (int(v) for v in a.long_decode.split(":"))
                results.setdefault("long_decode", {})[config] = time_long_decode(
                    model_dir, config, batch, lo, hi, 96, a.warmup
                )
        except Exception:
            results.setdefault("errors", {})[config] = traceback.format_exc()
            log(results["errors"][config])
        free_memory()
        save()
    text = table(results, batches)
    (out_path.with_suffix(".txt")).write_text(text + "\n")
    print(text)
    return 0


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
