#!/usr/bin/env python3
"""End-to-end offline throughput through the whole engine (scheduler daemon + worker), issue 3's workloads:

- seed: the seed's offline workload, 16 requests of 63 output tokens each;
- nanovllm: nano-vllm's offline bench, 256 requests with input and output lengths uniform in [100, 1024]
  (seed 0), temperature 0.6, ignore_eos.

Prompts are random token ids (as nano-vllm's are), sent as `input_ids`, so the numbers do not depend on the
weights: with `--random-weights` the model is Qwen2.5-0.5B's shapes with random bf16 weights (what the GPU
machine can hold), and the tokenizer files come from `--tokenizer-dir`. Each engine configuration starts its
own engine and runs every workload after a warm-up request.

    python scripts/bench_e2e.py --random-weights --tokenizer-dir DIR --out e2e.json [--no-overlap-too]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "worker_py"), str(ROOT / "scripts")]

from minisgl.client import LLM, SamplingParams  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def workloads(vocab: int = 10000) -> dict[str, list[tuple[list[int], SamplingParams]]]:
    rng = np.random.default_rng(0)
    nano = []
    for _ in range(256):
        prompt = rng.integers(0, vocab, int(rng.integers(100, 1025))).tolist()
        out = int(rng.integers(100, 1025))
        nano.append((prompt, SamplingParams(temperature=0.6, max_tokens=out, ignore_eos=True)))
    seed = [
        (rng.integers(0, vocab, 32).tolist(), SamplingParams(temperature=0.0, max_tokens=63, ignore_eos=True))
        for _ in range(16)
    ]
    return {"seed": seed, "nanovllm": nano}


def random_model(tokenizer_dir: Path, out: Path, tiny: bool) -> Path:
    import torch
    from bench_gpu import make_model

    if tiny:  # a CPU smoke test of this script
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        small = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        }
        Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, num_key_value_heads=2, **small)).save_pretrained(out)
    else:
        make_model(out, seed=0, init_std=0.02)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model: Path, name: str, engine_args: dict, loads: dict) -> dict:
    results = {}
    started = time.perf_counter()
    with LLM(str(model), listen=f"tcp://127.0.0.1:{free_port()}", **engine_args) as llm:
        startup = time.perf_counter() - started
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        for load, requests in tqdm(loads.items(), desc=name, file=sys.stderr):
            prompts, params = zip(*requests, strict=True)
            t0 = time.perf_counter()
            outs = llm.generate(list(prompts), list(params))
            seconds = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in outs)
            assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params, strict=True))
            results[load] = {
                "requests": len(outs),
                "output_tokens": tokens,
                "seconds": seconds,
                "output_tok_per_s": tokens / seconds,
            }
    return {"engine": engine_args, "startup_s": startup, "workloads": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="an HF checkpoint directory (else --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="Qwen2.5-0.5B shapes, random bf16 weights")
    p.add_argument("--tokenizer-dir", type=Path, default=ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct")
    p.add_argument(
        "--tiny", action="store_true", help="a tiny random model and small workloads (CPU smoke test)"
    )
    p.add_argument("--no-overlap-too", action="store_true", help="also run with overlap off, for comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-level", default="warn", help="the engine's (info: the scheduler's step summary)")
    p.add_argument("--workloads", default="seed,nanovllm", help="which to run, in this order")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()

    every = workloads()
    loads = {name: every[name] for name in a.workloads.split(",")}
    if a.tiny:
        loads = {
            k: [(pr[:40], replace(sp, max_tokens=8)) for pr, sp in reqs[:8]] for k, reqs in loads.items()
        }
    configs = {"overlap": {}}
    if a.no_overlap_too:
        configs["no overlap"] = {"overlap": False}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or random_model(a.tokenizer_dir, Path(tmp) / "model", a.tiny)
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "model": str(a.model) if a.model else "Qwen2.5-0.5B shapes, random bf16 weights (seed 0)",
            "configs": {
                name: run_config(model, name, {"device": a.device, "log_level": a.log_level, **args}, loads)
                for name, args in configs.items()
            },
        }
    print(f"# {report['date']}  {report['model']}")
    print(
        f"{'config':<12} {'workload':<10} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10}"
    )
    for name, r in report["configs"].items():
        for load, w in r["workloads"].items():
            print(
                f"{name:<12} {load:<10} {w['requests']:>8} {w['output_tokens']:>10} {w['seconds']:>8.3f} "
                f"{w['output_tok_per_s']:>10.0f}"
            )
    if a.out:
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
