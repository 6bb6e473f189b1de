"""Sampling options through the whole runner on the CPU (a tiny random Qwen2, float32): logit bias and the
penalties against HF transformers' generate with the same processors; the penalties' token counts across
chunked prefills, a prefix reused from the cache, and a preemption; logprobs in the result; batch invariance
with mixed options; and requests without options paying for none of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_steps import Join, ReadySteps, StepBuilder
from hf_reference import hf_greedy_join, load_hf
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.sampling.params import COUNT_MASK
from minisgl.sampling.penalties import TokenCounts
from minisgl.worker.loop import run_steps
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)

PAGE, PAGES = 4, 128
NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=4)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return load_hf(model_dir)


def make_runner(model_dir, **kw) -> ModelRunner:
    return ModelRunner(cpu_config(model_dir, PAGES, PAGE, 8, 64, **kw), show_progress=False)


def generate(runner, builder, reqs: dict[int, tuple[list[int], Join]], new_tokens: int = NEW, chunk=None):
    """Prefills every prompt (in chunks of `chunk` tokens when given: the join goes with the first), then
    decodes together; returns each slot's tokens."""
    got = {s: [] for s in reqs}
    chunk = chunk or max(len(p) for p, _ in reqs.values())
    offsets = dict.fromkeys(reqs, 0)
    while any(offsets[s] < len(p) for s, (p, _) in reqs.items()):
        items = [(s, p[offsets[s] : offsets[s] + chunk]) for s, (p, _) in reqs.items() if offsets[s] < len(p)]
        joins = [reqs[s][1] for s, _ in items if offsets[s] == 0]
        out = runner.run_step(builder.extend(items, joins=joins)).tolist()
        for (s, ids), tok in zip(items, out, strict=True):
            offsets[s] += len(ids)
            if offsets[s] == len(reqs[s][0]):
                got[s].append(tok)
    slots = list(reqs)
    for _ in range(new_tokens - 1):
        for s, tok in zip(slots, runner.run_step(builder.decode(slots)).tolist(), strict=True):
            got[s].append(tok)
    return got


PROMPTS = {
    0: [1, 2, 3, 1, 2, 3, 1, 2, 3, 4],
    3: [100, 200, 300, 100, 100],
    5: [7] * 9,
    6: list(range(40, 62)),
}
JOINS = {
    0: Join(0, repetition_penalty=1.5),
    3: Join(3, presence_penalty=1.5, frequency_penalty=0.5),
    5: Join(5, bias=((7, -3.0), (11, 2.0), (500, 1.5)), repetition_penalty=0.7, frequency_penalty=0.3),
    6: Join(6),  # no options, in the same batch
}


def test_greedy_penalties_and_bias_match_hf_generate(model_dir, hf_model):
    runner = make_runner(model_dir)
    got = generate(runner, StepBuilder(PAGES, PAGE), {s: (PROMPTS[s], JOINS[s]) for s in PROMPTS})
    for s in PROMPTS:
        assert got[s] == hf_greedy_join(hf_model, PROMPTS[s], JOINS[s], NEW), s
    # The options change the tokens (else the comparison would prove little).
    plain = generate(
        make_runner(model_dir), StepBuilder(PAGES, PAGE), {s: (PROMPTS[s], Join(s)) for s in PROMPTS}
    )
    assert all(plain[s] != got[s] for s in (0, 3, 5)) and plain[6] == got[6]


def test_counts_survive_chunked_prefill(model_dir):
    """Samples of unfinished chunks are thrown away by the scheduler; the counts must not see them either."""
    reqs = {s: (PROMPTS[s], JOINS[s]) for s in (0, 6)}
    whole = generate(make_runner(model_dir), StepBuilder(PAGES, PAGE), reqs)
    chunked = generate(make_runner(model_dir), StepBuilder(PAGES, PAGE), reqs, chunk=3)
    assert chunked == whole


def share_prefix(builder: StepBuilder, src: int, dst: int, pages: int) -> None:
    """What the prefix cache does: `dst` starts with the first `pages` pages of `src`, already computed."""
    builder.pages[dst] = builder.pages[src][:pages]
    builder.length[dst] = pages * PAGE


@pytest.mark.parametrize(
    "join", [Join(2, repetition_penalty=1.6), Join(2, presence_penalty=1.0, prompt_len=8)]
)
def test_a_prefix_from_the_cache_counts_like_one_computed_again(model_dir, join):
    prompt = [9, 8, 9, 8, 7, 7, 7, 9, 8, 1, 2]
    fresh_runner = make_runner(model_dir)
    fresh = generate(fresh_runner, StepBuilder(PAGES, PAGE), {2: (prompt, join)})[2]

    runner, builder = make_runner(model_dir), StepBuilder(PAGES, PAGE)
    runner.run_step(builder.extend([(0, prompt[:8])], joins=[Join(0)]))  # another request computes 2 pages
    share_prefix(builder, 0, 2, 2)
    cached = [runner.run_step(builder.extend([(2, prompt[8:])], joins=[join])).item()]
    for _ in range(NEW - 1):
        cached.append(runner.run_step(builder.decode([2])).item())
    assert cached == fresh
    assert torch.equal(runner.sampler.counts.counts[2], fresh_runner.sampler.counts.counts[2])


def test_a_preempted_request_resumes_with_the_same_counts(model_dir):
    """After a preemption the scheduler re-sends prompt + generated as the prompt of a new join (maybe in
    another slot); with the prompt length the generated part still counts as generated."""
    prompt = [3, 4, 5, 3, 4, 5]
    join = dict(temperature=0.9, seed=77, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.2)
    whole = generate(make_runner(model_dir), StepBuilder(PAGES, PAGE), {1: (prompt, Join(1, **join))}, 10)[1]

    runner, builder = make_runner(model_dir), StepBuilder(PAGES, PAGE)
    before = generate(runner, builder, {1: (prompt, Join(1, **join))}, 4)[1]
    builder.release(1)
    resumed = prompt + before
    after = generate(runner, builder, {4: (resumed, Join(4, prompt_len=len(prompt), **join))}, 6)[4]
    assert before + after == whole
    # Without the prompt length every re-sent id counts as prompt: the presence and frequency penalties would
    # lose the generated tokens.
    for prompt_len, generated in [(len(prompt), len(before)), (2**31 - 1, 0)]:
        runner, builder = make_runner(model_dir), StepBuilder(PAGES, PAGE)
        runner.run_step(builder.extend([(4, resumed)], joins=[Join(4, prompt_len=prompt_len, **join)]))
        runner.run_step(builder.decode([4]))  # the counts are taken from the tokens a step feeds the model
        counts = runner.sampler.counts.counts[4]
        assert int((counts & COUNT_MASK).sum()) == generated + 1  # and the token sampled at the prefill


def test_logprobs_in_the_result_are_log_softmax_of_the_logits(model_dir):
    prompts = {0: [5, 6, 7], 1: [8, 9], 2: [10, 11, 12, 13]}
    joins = [Join(0, logprobs=3), Join(1), Join(2, logprobs=0, temperature=1.0, seed=3)]
    b = StepBuilder(PAGES, PAGE)
    steps = [b.extend(list(prompts.items()), joins=joins), b.decode([0, 1, 2]), b.decode([1])]
    ready = ReadySteps(steps)
    runner = make_runner(model_dir)
    assert run_steps(runner, ready, ready) == 0
    # The same steps on a fresh runner, for their logits (the ids fed back are the ones sampled above).
    ref_runner, rb = make_runner(model_dir), StepBuilder(PAGES, PAGE)
    first = ref_runner.forward_logits(rb.extend(list(prompts.items()), joins=joins))
    tokens = [t for _, t in ready.results]
    second = ref_runner.forward_logits(rb.decode([0, 1, 2], tokens[0]))
    for logits, sampled, lp in [
        (first, tokens[0], ready.logprobs[0]),
        (second, tokens[1], ready.logprobs[1]),
    ]:
        ref = torch.log_softmax(logits.float(), dim=-1)
        torch.testing.assert_close(
            torch.from_numpy(lp.logprob), ref[torch.arange(3), sampled], rtol=0, atol=1e-5
        )
        assert lp.top_ids.shape == (3, 3)  # the most any request of the step asked for
        values, ids = ref.topk(3, dim=-1)
        assert lp.top_ids.tolist() == ids.tolist()
        torch.testing.assert_close(torch.from_numpy(lp.top_logprobs), values, rtol=0, atol=1e-5)
    assert ready.logprobs[2] is None, "a step whose requests did not ask carries none"


def test_mixed_options_are_batch_invariant_through_the_runner(model_dir):
    reqs = {
        1: ([10, 20, 30], Join(1, temperature=0.9, top_k=40, seed=2**64 - 3, min_p=0.05, logprobs=2)),
        4: ([5, 6, 7, 8, 9], Join(4, temperature=1.2, top_p=0.9, seed=11, presence_penalty=0.7)),
        0: ([99] * 6, Join(0, repetition_penalty=1.3, bias=((3, 1.0),))),
        6: ([1, 2], Join(6, temperature=0.7, seed=11, frequency_penalty=0.4, bias=((1, -2.0), (2, 5.0)))),
        7: ([1, 2, 3], Join(7, temperature=1.0, seed=5)),
    }
    alone = {}
    for slot, req in reqs.items():
        alone |= generate(make_runner(model_dir), StepBuilder(PAGES, PAGE), {slot: req})
    batched = generate(make_runner(model_dir), StepBuilder(PAGES, PAGE, seed=1), reqs)
    assert batched == alone


def test_requests_without_options_pay_for_none(model_dir, monkeypatch):
    runner = make_runner(model_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("counted tokens for a step without penalties")

    monkeypatch.setattr(TokenCounts, "add", refuse)
    monkeypatch.setattr(TokenCounts, "reset", refuse)
    monkeypatch.setattr(runner.sampler, "logprobs", refuse)
    reqs = {s: (PROMPTS[s], Join(s, temperature=0.8, seed=s, top_p=0.9)) for s in PROMPTS}
    generate(runner, StepBuilder(PAGES, PAGE), reqs, 4)
    plan = runner.sampler.plan_for(np.array(list(PROMPTS)))
    assert not (plan.bias or plan.penalties or plan.min_p or plan.logprobs)
