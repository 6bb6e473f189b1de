"""Sampling through the runner: a seeded request draws the same tokens alone and in any batch."""

from __future__ import annotations

import pytest
import torch
from fake_steps import Join, StepBuilder
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)

STEPS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=4)


def make_runner(model_dir) -> ModelRunner:
    return ModelRunner(cpu_config(model_dir, 128, 4, 8, 64), show_progress=False)


def run(runner, builder, reqs: dict[int, tuple[list[int], Join]], start: dict[int, int] | None = None):
    """Requests join at their start step (default 0) with their sampling parameters; returns their tokens."""
    start = start or {}
    got = {s: [] for s in reqs}
    for step in range(STEPS + max(start.values(), default=0)):
        live = [s for s in reqs if start.get(s, 0) < step and len(got[s]) < STEPS]
        joining = [s for s in reqs if start.get(s, 0) == step]
        if not live and not joining:
            continue
        items = [(s, [-(s + 1)]) for s in live] + [(s, reqs[s][0]) for s in joining]
        out = runner.run_step(builder.extend(items, joins=[reqs[s][1] for s in joining]))
        for (s, _), tok in zip(items, out.tolist(), strict=True):
            got[s].append(tok)
    return got


def test_seeded_request_same_tokens_alone_and_in_batch(model_dir):
    reqs = {
        1: ([10, 20, 30], Join(1, temperature=0.9, top_k=40, seed=2**64 - 3)),
        4: ([5, 6, 7, 8, 9], Join(4, temperature=1.2, top_p=0.9, seed=11)),
        0: ([99] * 6, Join(0)),  # greedy
        6: ([1, 2], Join(6, temperature=0.7, seed=11)),
    }
    alone = {}
    for slot, req in reqs.items():
        alone |= run(make_runner(model_dir), StepBuilder(128, 4), {slot: req})
    batched = run(make_runner(model_dir), StepBuilder(128, 4, seed=1), reqs, start={4: 2, 6: 5})
    assert batched == alone
    # The sampled path really samples: it leaves the greedy path.
    greedy = run(make_runner(model_dir), StepBuilder(128, 4), {1: (reqs[1][0], Join(1))})
    assert alone[1] != greedy[1]


def test_top_k_one_equals_greedy_and_rejoining_resets_params(model_dir):
    prompt = [3, 3, 4]
    greedy = run(make_runner(model_dir), StepBuilder(128, 4), {2: (prompt, Join(2))})
    runner, builder = make_runner(model_dir), StepBuilder(128, 4)
    top1 = run(runner, builder, {2: (prompt, Join(2, temperature=1.5, top_k=1, seed=9))})
    assert top1 == greedy
    builder.release(2)
    hot = run(runner, builder, {2: (prompt, Join(2, temperature=5.0, seed=9))})
    assert hot != greedy
    builder.release(2)
    # The slot is reused by a greedy request: its join must replace the previous request's parameters.
    assert run(runner, builder, {2: (prompt, Join(2))}) == greedy
