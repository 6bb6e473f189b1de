"""Tensor parallelism through the whole engine on the CPU (gloo): two worker ranks give exactly the greedy
fp32 tokens of one, for the real default model and for a small random Qwen3-MoE (whose vocabulary, the real
tokenizer's 151,665 ids, does not divide by two); a rank that dies stops the engine with an error naming it
and leaves no process and no shared-memory segment; a --tp the model cannot split over is refused before
anything starts.

Both ranks share the machine's cores, so the prompts and completions are short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_tcp_port
from hf_families import make_checkpoint, tokenizer_size
from test_launch import assert_all_gone, children_of, launch, our_segments, wait_ready

NEW_TOKENS = 8


def generate(model: Path, prompts: list, tp: int) -> list[list[int]]:
    from minisgl.client import LLM, SamplingParams

    with LLM(
        str(model),
        tp=tp,
        device="cpu",
        dtype="float32",
        num_pages=64,
        page_size=16,
        max_batch=4,
        max_step_tokens=256,
        log_level="warn",
    ) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return [o.token_ids for o in outs]


def test_default_model_on_two_ranks_gives_the_tokens_of_one(model_dir):
    prompts = [
        "def fibonacci(n):\n    ",
        [{"role": "user", "content": "Why is the sky blue?"}],
        "北京是中国的首都，",
    ]
    one = generate(model_dir, prompts, tp=1)
    assert generate(model_dir, prompts, tp=2) == one
    assert all(len(t) == NEW_TOKENS for t in one)


def test_qwen3_moe_on_two_ranks_gives_the_tokens_of_one(model_dir, tmp_path):
    path = make_checkpoint(
        "qwen3_moe", tmp_path / "moe", vocab_size=tokenizer_size(model_dir), tokenizer_from=model_dir
    )
    prompts = [[101, 2002, 30003, 444, 5], list(range(1000, 1040))]
    one = generate(path, prompts, tp=1)
    assert generate(path, prompts, tp=2) == one
    assert len({tuple(t) for t in one}) == 2


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_stops_the_engine_and_leaves_nothing(tiny_model, victim, tmp_path):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    log_path = tmp_path / "log"
    with log_path.open("w") as log:
        proc = launch(tiny_model, address, "--tp", "2", "--log-level", "info", stderr=log)
    try:
        wait_ready(proc, address)
        children = children_of(proc.pid)
        ranks = {}
        for pid in children:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"minisgl.worker" in cmd:
                ranks[int(cmd[cmd.index(b"--tp-rank") + 1])] = pid
        assert len(children) == 3 and sorted(ranks) == [0, 1], "the scheduler and two ranks"
        assert len(our_segments(proc.pid)) == 2
        os.kill(ranks[victim], signal.SIGKILL)
        assert proc.wait(60) == 1
        assert_all_gone(proc.pid, children)
        text = log_path.read_text()
        # (The launcher may still be waiting for its own first answer: "before the engine was ready" then.)
        assert f"the worker rank {victim} (pid {ranks[victim]}) was killed by SIGKILL" in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_tp_the_model_cannot_split_over_is_refused_at_once(model_dir):
    cmd = [sys.executable, "-m", "minisgl", "serve", str(model_dir), "--tp", "4", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "its 14 attention heads do not split evenly over 4 ranks" in done.stderr
    assert "(sizes that work: 1, 2)" in done.stderr
