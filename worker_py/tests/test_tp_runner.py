"""The runner split over two gloo ranks against the runner on one: the same greedy tokens, and every rank
samples the same tokens (no broadcast: the logits are all-gathered and the noise is a function of the seed,
the position and the vocabulary id), for a dense model, one whose single KV head is replicated, and a
Qwen3-MoE whose vocabulary does not divide by the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fake_steps import Join, StepBuilder
from hf_families import make_checkpoint
from tiny_qwen import cpu_config, make_tiny_qwen
from tp_ranks import run_ranks

from minisgl.worker.runner import ModelRunner

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 200, 300], list(range(300, 322))]
SLOTS = [2, 0, 1]
NEW_TOKENS = 8
PAGE_SIZE, NUM_PAGES = 4, 48


def _generate(runner: ModelRunner, sampled: bool) -> list[list[int]]:
    """All prompts prefilled in one step, then decoded together; greedy, or sampled with a penalty."""
    joins = []
    if sampled:
        joins = [
            Join(s, temperature=0.9, top_p=0.9, top_k=50, seed=11 * s + 1, repetition_penalty=1.3)
            for s in SLOTS
        ]
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=3)
    out = [runner.run_step(builder.extend(list(zip(SLOTS, PROMPTS, strict=True)), joins))]
    for _ in range(NEW_TOKENS - 1):
        out.append(runner.run_step(builder.decode(SLOTS)))
    return torch.stack(out, dim=1).tolist()


def _tokens(rank: int, tp: int, dirs: dict[str, Path]) -> dict[str, dict[bool, list[list[int]]]]:
    out = {}
    for name, path in dirs.items():
        config = cpu_config(path, NUM_PAGES, PAGE_SIZE, 4, 64, tp=tp)
        runner = ModelRunner(config, show_progress=False, tp_rank=rank)
        out[name] = {sampled: _generate(runner, sampled) for sampled in (False, True)}
        attn = runner.model.model.layers[0].self_attn
        out[name]["split"] = (attn.num_heads, attn.num_kv_heads, runner.model.lm_head.slice.rows)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {
        "qwen2": make_tiny_qwen(root / "qwen2", seed=5),
        "qwen2 one KV head": make_tiny_qwen(root / "kv1", seed=6, kv_heads=1),
        "qwen3_moe odd vocab": make_checkpoint("qwen3_moe", root / "moe", vocab_size=511),
    }


def test_two_ranks_give_the_tokens_of_one(model_dirs):
    torch.set_num_threads(1)
    one = _tokens(0, 1, model_dirs)
    ranks = run_ranks(_tokens, 2, model_dirs)
    assert [r["qwen2"]["split"] for r in (one, *ranks)] == [(4, 2, 512), (2, 1, 256), (2, 1, 256)]
    assert ranks[1]["qwen2 one KV head"]["split"] == (2, 1, 256), "the KV head is replicated"
    assert ranks[1]["qwen3_moe odd vocab"]["split"][2] == 256, "511 ids: 256 a rank, the last one padded"
    for name in model_dirs:
        assert ranks[0][name] == ranks[1][name], f"{name}: the ranks sampled different tokens"
        assert ranks[0][name][False] == one[name][False], f"{name}: greedy tokens differ from one rank's"
        assert ranks[0][name][True] == one[name][True], f"{name}: sampled tokens differ from one rank's"
        assert len({tuple(t) for t in one[name][True]}) > 1, "the samples are not all alike"
