"""The sampler's options beyond temperature/top-k/top-p/seed, each against a plain reference of the same rule
on the same logits: logit bias, repetition/frequency/presence penalties (HF's processors and OpenAI's
formula), min_p (HF's warper), logprobs (torch.log_softmax); batch invariance with every option mixed in one
batch; and that rows without options are left alone and steps without them skip the work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minisgl.proto.step import MAX_LOGIT_BIAS
from minisgl.sampling import Joins, SampleMode, SamplePlan, Sampler
from minisgl.sampling.noise import gumbel, vocab_keys
from minisgl.sampling.params import COUNT_MASK, PROMPT_SEEN
from minisgl.sampling.penalties import TokenCounts
from minisgl.sampling.sampler import _min_p

torch.set_num_threads(1)

VOCAB = 300


def logits_of(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def sampler_with(rows: list[dict], vocab: int = VOCAB, max_slots: int = 16) -> tuple[Sampler, torch.Tensor]:
    """A sampler whose slots 0..len(rows)-1 joined with the given options (the fields of `Joins.make`)."""
    sampler = Sampler(max_slots, "cpu", vocab_size=vocab)
    slots = np.arange(len(rows))
    base = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 0}
    cols = {k: [r.get(k, v) for r in rows] for k, v in base.items()}
    options = {k for r in rows for k in r} - set(base) - {"bias"}
    extra = {k: [r.get(k, Joins.make([0], 0, 1, -1, 0).__dict__[k][0]) for r in rows] for k in options}
    sampler.set_params(slots, **cols, bias=[r.get("bias", []) for r in rows], **extra)
    return sampler, torch.from_numpy(slots.astype(np.int32))


def count_history(sampler: Sampler, slot: int, prompt: list[int], generated: list[int]) -> None:
    """Counts a sequence as the runner does: prompt ids as prompt, fed-back samples as generated."""
    ids = torch.tensor(prompt + generated, dtype=torch.int32)
    positions = torch.arange(len(ids), dtype=torch.int32)
    sampled = torch.tensor([False] * len(prompt) + [True] * len(generated))
    sampler.count(torch.full((len(ids),), slot, dtype=torch.int32), ids, positions, sampled)


def reference_penalties(logits, prompt, generated, repetition, frequency, presence, bias=()):
    """HF's SequenceBias and RepetitionPenalty processors, then OpenAI's frequency and presence rule, one
    row."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
    )

    row = logits[None].clone()
    input_ids = torch.tensor([prompt + generated])
    if bias:
        row = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(input_ids, row)
    if repetition != 1.0:
        row = RepetitionPenaltyLogitsProcessor(repetition)(input_ids, row)
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=VOCAB).float()
    return (row[0] - frequency * counts - presence * (counts > 0).float()).float()


def test_penalties_and_bias_match_hf_and_openai_rules():
    rng = np.random.default_rng(0)
    rows = [
        {"repetition_penalty": 1.3},
        {"presence_penalty": 0.8},
        {"frequency_penalty": 0.45},
        {"repetition_penalty": 0.7, "presence_penalty": -0.5, "frequency_penalty": 1.1},
        {"bias": [(3, 5.0), (7, -100.0), (299, 0.25)]},
        {"bias": [(1, 2.0)], "repetition_penalty": 1.5, "frequency_penalty": 0.2},
        {},  # no option beside the others
    ]
    sampler, slots = sampler_with(rows)
    history = []
    for slot in range(len(rows)):
        prompt = rng.integers(0, 40, 12).tolist()  # a small range: repeats, and overlap with the generated
        generated = rng.integers(0, 40, 9).tolist()
        count_history(sampler, slot, prompt, generated)
        history.append((prompt, generated))
    logits = logits_of(len(rows), 1)
    plan = sampler.plan_for(slots.numpy())
    assert plan.bias and plan.penalties
    ours = sampler.adjust(logits, slots, plan)
    for slot, r in enumerate(rows):
        prompt, generated = history[slot]
        ref = reference_penalties(
            logits[slot],
            prompt,
            generated,
            r.get("repetition_penalty", 1.0),
            r.get("frequency_penalty", 0.0),
            r.get("presence_penalty", 0.0),
            r.get("bias", ()),
        )
        torch.testing.assert_close(ours[slot], ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(ours[-1], logits[-1]), "a row without options is left exactly as it was"
    # Greedy rows take the argmax of the adjusted logits; the input logits are not modified.
    assert torch.equal(sampler.sample(logits, slots, torch.zeros(len(rows)), plan), ours.argmax(-1).int())
    assert not torch.equal(ours, logits)


def test_repetition_penalty_counts_prompt_and_generated_tokens_alike():
    sampler, slots = sampler_with([{"repetition_penalty": 2.0}])
    logits = torch.zeros(1, VOCAB)
    logits[0, :4] = torch.tensor([4.0, -4.0, 4.0, 4.0])
    count_history(sampler, 0, prompt=[0, 0], generated=[1])
    out = sampler.adjust(logits, slots, sampler.plan_for(slots.numpy()))[0]
    assert out[:4].tolist() == [2.0, -8.0, 4.0, 4.0]


def test_counts_keep_the_prompt_flag_and_the_generated_count_apart():
    counts = TokenCounts(3, 10, "cpu")
    slots = torch.tensor([1, 1, 1, 1, 1, 2])
    ids = torch.tensor([4, 4, 4, 5, 6, 4])
    generated = torch.tensor([False, True, True, False, True, True])
    counts.add(slots, ids, generated)
    counts.add(slots[:1], ids[:1], torch.tensor([False]))  # a prompt token seen again: still one flag
    c = counts.counts
    assert c[1, 4].item() == PROMPT_SEEN + 2 and c[1, 5].item() == PROMPT_SEEN and c[1, 6].item() == 1
    assert c[2, 4].item() == 1 and int(c[0].abs().sum()) == 0
    assert (c[1] & COUNT_MASK).tolist() == [0, 0, 0, 0, 2, 0, 1, 0, 0, 0]
    counts.reset(torch.tensor([1]))
    assert int(c[1].abs().sum()) == 0 and c[2, 4].item() == 1


def test_tokens_past_the_prompt_length_count_as_generated():
    """After a preemption the generated tokens come back as prompt ids; the prompt length tells them apart."""
    sampler, slots = sampler_with([{"frequency_penalty": 1.0, "prompt_len": 3}])
    ids = torch.tensor([9, 9, 8, 9, 7], dtype=torch.int32)
    sampler.count(torch.zeros(5, dtype=torch.int32), ids, torch.arange(5, dtype=torch.int32))
    c = sampler.counts.counts[0]
    assert c[9].item() == PROMPT_SEEN + 1 and c[8].item() == PROMPT_SEEN and c[7].item() == 1


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_what_hf_warper_keeps(min_p):
    from transformers.generation.logits_process import MinPLogitsWarper

    scaled = logits_of(64, 2, scale=2.0)
    ours = _min_p(scaled, torch.full((64,), float(np.log(min_p))))
    ref = MinPLogitsWarper(min_p)(None, scaled.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], scaled[~torch.isinf(ours)])
    # Off: nothing dropped.
    assert torch.equal(_min_p(scaled, torch.full((64,), float("-inf"))), scaled)


def reference_draw(logits_row, row: dict, position: int, prompt=(), generated=()) -> int:
    """One row through the whole rule with reference parts: HF's processors and warpers, then our noise."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    adjusted = reference_penalties(
        logits_row,
        list(prompt),
        list(generated),
        row.get("repetition_penalty", 1.0),
        row.get("frequency_penalty", 0.0),
        row.get("presence_penalty", 0.0),
        row.get("bias", ()),
    )
    t = row.get("temperature", 0.0)
    if t == 0:
        return int(adjusted.argmax())
    scaled = (adjusted / t)[None]
    if row.get("top_k", -1) > 0:
        scaled = TopKLogitsWarper(row["top_k"])(None, scaled)
    if row.get("top_p", 1.0) < 1:
        scaled = TopPLogitsWarper(row["top_p"])(None, scaled)
    if row.get("min_p", 0.0) > 0:
        scaled = MinPLogitsWarper(row["min_p"])(None, scaled)
    seed = torch.tensor([np.uint64(row.get("seed", 0)).astype(np.int64)])
    noise = gumbel(seed, torch.tensor([position]), vocab_keys(VOCAB, "cpu"))
    return int((scaled + noise).argmax())


MIXED = [
    {"temperature": 0.9, "seed": 1, "min_p": 0.3},
    {"temperature": 0.0, "repetition_penalty": 1.8, "logprobs": 3},
    {"temperature": 1.3, "seed": 2, "top_k": 20, "presence_penalty": 4.0, "bias": [(5, 3.0)]},
    {"temperature": 0.7, "seed": 3, "top_p": 0.8, "min_p": 0.1, "frequency_penalty": 2.0, "logprobs": 0},
    {"temperature": 1.0, "seed": 2**64 - 1},
    {"temperature": 0.0},
    {"temperature": 1.1, "seed": 4, "bias": [(i, -5.0) for i in range(0, VOCAB, 2)]},
    {"temperature": 0.8, "seed": 5, "top_k": 50, "top_p": 0.9, "min_p": 0.2, "repetition_penalty": 3.0},
]


def mixed_history(slot: int, row: torch.Tensor) -> tuple[list[int], list[int]]:
    """A prompt and generated tokens that share the row's most likely tokens, so the penalties change
    draws."""
    rng = np.random.default_rng(100 + slot)
    top = row.topk(8).indices.tolist()
    return top[:5] + rng.integers(0, VOCAB, 5).tolist(), top[2:7] + top[3:4] + rng.integers(
        0, VOCAB, 3
    ).tolist()


def test_every_option_together_draws_what_the_reference_draws():
    sampler, slots = sampler_with(MIXED)
    logits = logits_of(len(MIXED), 3, scale=1.0)  # flat enough that the options change draws
    for slot in range(len(MIXED)):
        count_history(sampler, slot, *mixed_history(slot, logits[slot]))
    positions = torch.arange(10, 10 + len(MIXED), dtype=torch.int32)
    plan = sampler.plan_for(slots.numpy())
    assert plan == SamplePlan(SampleMode.FILTERED, bias=True, penalties=True, min_p=True, top_logprobs=3)
    ours = sampler.sample(logits, slots, positions, plan).tolist()
    want = [
        reference_draw(logits[i], MIXED[i], int(positions[i]), *mixed_history(i, logits[i]))
        for i in range(len(MIXED))
    ]
    assert ours == want
    # The options matter: without them most of the six rows that have some draw something else.
    plain = [{k: v for k, v in r.items() if k in ("temperature", "seed", "top_k", "top_p")} for r in MIXED]
    without, plain_slots = sampler_with(plain)
    unchanged = without.sample(logits, plain_slots, positions, without.plan_for(plain_slots.numpy()))
    assert sum(a != b for a, b in zip(ours, unchanged.tolist(), strict=True)) >= 4


def test_mixed_options_are_batch_invariant():
    """Each row draws the same token, with the same logprobs, alone or among rows with other options, in any
    order and in any slot."""
    logits = logits_of(len(MIXED), 4)
    positions = torch.arange(len(MIXED), dtype=torch.int32) * 7
    together, together_slots = sampler_with(MIXED)
    for slot in range(len(MIXED)):
        count_history(together, slot, *mixed_history(slot, logits[slot]))
    plan = together.plan_for(together_slots.numpy())
    drawn = together.sample(logits, together_slots, positions, plan)
    lp, top_ids, top_lp = Sampler.logprobs(logits, drawn, plan.top_logprobs)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    shuffled = together.sample(logits[perm], together_slots[perm], positions[perm], plan)
    assert torch.equal(shuffled, drawn[perm])
    for i, row in enumerate(MIXED):
        alone, _ = sampler_with([{}] * 3 + [row])  # slot 3, beside joins without options
        count_history(alone, 3, *mixed_history(i, logits[i]))
        slot = torch.tensor([3], dtype=torch.int32)
        alone_plan = alone.plan_for(slot.numpy())
        token = alone.sample(logits[i : i + 1], slot, positions[i : i + 1], alone_plan)
        assert token.item() == drawn[i].item(), (i, row)
        if row.get("logprobs", -1) >= 0:
            a_lp, a_ids, a_top = Sampler.logprobs(logits[i : i + 1], token, alone_plan.top_logprobs)
            assert a_lp.item() == lp[i].item()
            k = row["logprobs"]
            assert a_ids[0, :k].tolist() == top_ids[i, :k].tolist()
            assert a_top[0, :k].tolist() == top_lp[i, :k].tolist()


def test_logprobs_are_log_softmax_of_the_raw_logits():
    logits = logits_of(5, 5)
    sampler, slots = sampler_with([{"temperature": 0.5, "seed": 1, "logprobs": 4, "bias": [(0, 50.0)]}] * 5)
    drawn = sampler.sample(logits, slots, torch.zeros(5, dtype=torch.int32), sampler.plan_for(slots.numpy()))
    assert drawn.tolist() == [0] * 5  # the bias decides the draw, not the logprobs
    lp, ids, values = Sampler.logprobs(logits, drawn, 4)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.equal(lp, ref[:, 0])
    ref_values, ref_ids = ref.topk(4, dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids.int())
    assert ids.dtype == torch.int32 and values.dtype == torch.float32
    lp, ids, values = Sampler.logprobs(logits.bfloat16(), drawn, 0)
    assert ids.shape == (5, 0) and lp.dtype == torch.float32


def test_rows_without_options_skip_every_pass():
    sampler, slots = sampler_with([{"temperature": 0.8, "seed": 1}, {}, {"top_k": 3, "temperature": 1.0}])
    plan = sampler.plan_for(slots.numpy())
    assert plan == SamplePlan(SampleMode.FILTERED)
    assert not sampler.needs_counts(slots.numpy())
    logits = logits_of(3, 6)
    assert sampler.adjust(logits, slots, plan) is logits
    # A step of only greedy rows with min_p needs no min_p pass either.
    greedy, gslots = sampler_with([{"min_p": 0.5}])
    assert greedy.plan_for(gslots.numpy()) == SamplePlan(SampleMode.GREEDY)


def test_a_rejoined_slot_forgets_the_previous_requests_options():
    sampler, slots = sampler_with(
        [{"bias": [(1, 50.0)], "repetition_penalty": 3.0, "min_p": 0.5, "logprobs": 5, "temperature": 1.0}]
    )
    count_history(sampler, 0, [2, 3], [4])
    assert sampler.plan_for(slots.numpy()).top_logprobs == 5
    sampler.set_params(np.array([0]), 1.0, 1.0, -1, np.array([9], np.uint64))
    p = sampler.params
    assert p.bias_values[0].abs().sum().item() == 0 and p.repetition_penalty[0].item() == 1.0
    assert p.log_min_p[0].item() == float("-inf")
    assert sampler.plan_for(slots.numpy()) == SamplePlan(SampleMode.PLAIN)
    # Beside a slot that does use the passes, the rejoined row comes out as if they did not exist.
    sampler.set_params(
        np.array([1]), 1.0, 1.0, -1, np.array([1], np.uint64), bias=[[(5, 1.0)]], repetition_penalty=[1.2]
    )
    both = torch.tensor([0, 1], dtype=torch.int32)
    logits = logits_of(2, 7)
    adjusted = sampler.adjust(logits, both, sampler.plan_for(both.numpy()))
    assert torch.equal(adjusted[0], logits[0])


def test_bias_rows_hold_up_to_the_limit_and_ignore_ids_outside_the_vocabulary():
    full = [(i, float(i % 7) - 3.0) for i in range(MAX_LOGIT_BIAS)]
    sampler, slots = sampler_with([{"bias": full}, {"bias": [(VOCAB, 1.0), (-3, 1.0), (2, 4.0)]}])
    logits = torch.zeros(2, VOCAB)
    out = sampler.adjust(logits, slots, sampler.plan_for(slots.numpy()))
    expected = torch.zeros(VOCAB)
    expected[:MAX_LOGIT_BIAS] = torch.tensor([v for _, v in full])
    assert torch.equal(out[0], expected)
    assert out[1].nonzero().flatten().tolist() == [2] and out[1, 2].item() == 4.0
