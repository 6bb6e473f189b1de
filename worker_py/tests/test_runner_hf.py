"""The runner against HF transformers on a tiny random Qwen2: logits, greedy tokens, paging, chunking."""

from __future__ import annotations

import pytest
import torch
from fake_steps import StepBuilder
from hf_reference import hf_greedy, hf_last_logits, load_hf
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 200, 300], [5] * 13, [42], list(range(300, 322))]
NEW_TOKENS = 20
PAGE_SIZE = 4
NUM_PAGES = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


@pytest.fixture(scope="module")
def hf_tokens(hf_model):
    return [hf_greedy(hf_model, p, NEW_TOKENS) for p in PROMPTS]


def make_runner(model_dir) -> ModelRunner:
    return ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 8, 128), show_progress=False)


def generate(runner: ModelRunner, builder: StepBuilder, slots: list[int], prompts, explicit_ids=False):
    """Prefill all prompts in one step, then decode together; returns each request's tokens."""
    out = [runner.run_step(builder.extend(list(zip(slots, prompts, strict=True))))]
    for _ in range(NEW_TOKENS - 1):
        ids = out[-1].tolist() if explicit_ids else None
        out.append(runner.run_step(builder.decode(slots, ids)))
    return torch.stack(out, dim=1).tolist()


def test_prefill_logits_match_hf(model_dir, hf_model):
    runner = make_runner(model_dir)
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE)
    logits = runner.forward_logits(builder.extend(list(enumerate(PROMPTS))))
    assert logits.shape == (len(PROMPTS), 512)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i], hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)


def test_greedy_batch_matches_hf(model_dir, hf_tokens):
    runner = make_runner(model_dir)
    slots = [3, 0, 7, 5, 1]  # slots need not follow request order
    assert generate(runner, StepBuilder(NUM_PAGES, PAGE_SIZE, seed=1), slots, PROMPTS) == hf_tokens


def test_greedy_one_by_one_matches_hf_with_recycled_pages(model_dir, hf_tokens):
    runner = make_runner(model_dir)
    builder = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=2)
    for prompt, expected in zip(PROMPTS, hf_tokens, strict=True):
        # Pages return to the free list after each request, so later requests reuse pages full of stale K/V.
        assert generate(runner, builder, [2], [prompt]) == [expected]
        builder.release(2)


def test_explicit_decode_ids_equal_negative_ids(model_dir, hf_tokens):
    runner = make_runner(model_dir)
    got = generate(
        runner, StepBuilder(NUM_PAGES, PAGE_SIZE, seed=3), [0, 1, 2, 3, 4], PROMPTS, explicit_ids=True
    )
    assert got == hf_tokens


def test_chunked_prefill_mixed_with_decodes(model_dir, hf_tokens):
    """Prompt 4 is prefilled in two chunks; its second chunk shares an extend step with prompt 0's decode."""
    runner = make_runner(model_dir)
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=4)
    long = PROMPTS[4]
    first = runner.run_step(b.extend([(0, PROMPTS[0]), (4, long[:9])]))
    tokens0, tokens4 = [first[0].item()], []
    second = runner.run_step(b.extend([(0, [-1]), (4, long[9:])]))  # -1 = slot 0's last token
    tokens0.append(second[0].item())
    tokens4.append(second[1].item())
    for _ in range(NEW_TOKENS - 1):
        out = runner.run_step(b.decode([4, 0]))
        tokens4.append(out[0].item())
        tokens0.append(out[1].item())
    assert tokens4 == hf_tokens[4]
    assert tokens0[:NEW_TOKENS] == hf_tokens[0]


def test_staggered_batch_equals_each_request_alone(model_dir):
    """Requests join at different steps, in one extend step with others' decodes; each one's tokens equal
    what it produces alone."""
    prompts = {0: PROMPTS[0], 6: PROMPTS[4], 2: PROMPTS[1]}
    alone = {}
    for slot, prompt in prompts.items():
        runner = make_runner(model_dir)
        alone[slot] = generate(runner, StepBuilder(NUM_PAGES, PAGE_SIZE), [slot], [prompt])[0]

    runner = make_runner(model_dir)
    b = StepBuilder(NUM_PAGES, PAGE_SIZE, seed=5)
    got: dict[int, list[int]] = {s: [] for s in prompts}
    live: list[int] = []
    for step in range(NEW_TOKENS + 6):
        joining = [s for s, at in ((0, 0), (6, 3), (2, 6)) if at == step]
        live = [s for s in live if len(got[s]) < NEW_TOKENS]
        reqs = [(s, [-(s + 1)]) for s in live] + [(s, prompts[s]) for s in joining]
        if not reqs:
            break
        out = runner.run_step(b.extend(reqs) if joining else b.decode([s for s, _ in reqs]))
        for (s, _), tok in zip(reqs, out.tolist(), strict=True):
            got[s].append(tok)
        live += joining
    assert got == alone
