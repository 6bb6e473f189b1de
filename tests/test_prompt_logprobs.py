"""Prompt logprobs end to end (issue 10): `/v1/completions` with `echo` and `logprobs` through the official
`openai` package, on the session engine (the real default model, fp32 on the CPU), against HF transformers'
log_softmax over the same prompt; streamed equals not streamed; a warm prefix cache, `n` samples, a prompt
pushed through several prefill chunks (an engine of its own with a small step budget) and the ZeroMQ door all
give the same numbers; `max_tokens: 0` gives the prompt alone."""

from __future__ import annotations

import openai
import pytest
from conftest import cpu_engine_config
from hf_reference import hf_prompt_logprobs, load_hf_with_tokenizer

PROMPT = (
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n\n"
    "def variance(xs):\n    m = mean(xs)\n    return"
)
AS_IDS = {"return_tokens_as_token_ids": True}
TOLERANCE = 1e-4
TOP = 3


def client_of(engine) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{engine.config.http}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def oai(engine):
    return client_of(engine)


@pytest.fixture(scope="module")
def hf(model_dir):
    """The prompt's ids, and log_softmax of HF's logits over it in one forward: row p is the distribution of
    the token at p + 1."""
    tok, model = load_hf_with_tokenizer(model_dir)
    ids = tok(PROMPT).input_ids
    return ids, hf_prompt_logprobs(model, ids)


def ids_of(tokens) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def echoed(oai, **kwargs):
    base = dict(model="m", prompt=PROMPT, echo=True, logprobs=TOP, max_tokens=2, temperature=0)
    return oai.completions.create(**{**base, **kwargs})


def assert_prompt_matches_hf(hf, logprobs, k: int = TOP) -> None:
    """The first len(prompt) entries of a choice's `logprobs` (tokens written as ids) are the prompt's, with
    HF's logprobs and `k` top tokens."""
    ids, ref = hf
    n = len(ids)
    assert ids_of(logprobs.tokens[:n]) == ids
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for p in range(1, n):
        row = ref[p - 1]
        assert abs(logprobs.token_logprobs[p] - row[ids[p]].item()) < TOLERANCE, p
        top = {int(t.removeprefix("token_id:")): v for t, v in logprobs.top_logprobs[p].items()}
        assert len(top) == k, p
        values, best = row.topk(k)
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=TOLERANCE), p
        for t, v in top.items():
            assert abs(row[t].item() - v) < TOLERANCE, (p, t)
        # Ties aside, the same tokens.
        tie = k > 1 and (values[-2] - values[-1]).abs() < TOLERANCE
        assert set(top) == set(best.tolist()) or tie, p


def flatten(logprobs) -> tuple[list, list, list, list]:
    return logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset


def close(a: list, b: list) -> bool:
    return all(
        (x is None and y is None) or x == pytest.approx(y, abs=1e-5) for x, y in zip(a, b, strict=True)
    )


def test_echo_with_logprobs_gives_the_prompts_logprobs_as_hf_computes_them(oai, hf):
    ids, _ = hf
    r = echoed(oai, extra_body=AS_IDS)
    choice = r.choices[0]
    assert_prompt_matches_hf(hf, choice.logprobs)
    # Then the generated tokens, as without echo.
    assert len(choice.logprobs.tokens) == len(ids) + 2 == r.usage.prompt_tokens + r.usage.completion_tokens
    plain = oai.completions.create(model="m", prompt=PROMPT, logprobs=TOP, max_tokens=2, temperature=0)
    assert ids_of(choice.logprobs.tokens[len(ids) :]) == ids_of(
        oai.completions.create(
            model="m", prompt=PROMPT, logprobs=TOP, max_tokens=2, temperature=0, extra_body=AS_IDS
        )
        .choices[0]
        .logprobs.tokens
    )
    assert choice.logprobs.token_logprobs[len(ids) :] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-5
    )
    assert r.usage.prompt_tokens_details.cached_tokens == 0, "the prompt's logits were all computed"

    # As text: the tokens spell the choice's text, and each offset is where its token starts in it.
    text = echoed(oai).choices[0]
    assert text.text == PROMPT + plain.choices[0].text
    lp = text.logprobs
    assert "".join(lp.tokens) == text.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset[len(ids)] == len(PROMPT)


def test_streamed_equals_not_streamed_and_a_warm_cache_changes_nothing(oai, hf):
    ids, _ = hf
    whole = echoed(oai, extra_body=AS_IDS).choices[0].logprobs
    # The prompt is cached by now: the same request again computes it all the same.
    again = echoed(oai, extra_body=AS_IDS)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert close(flatten(again.choices[0].logprobs)[1], whole.token_logprobs)
    assert flatten(again.choices[0].logprobs)[0] == whole.tokens
    # Others do take it from the cache.
    plain = oai.completions.create(model="m", prompt=PROMPT, max_tokens=1, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0

    chunks = [c for c in echoed(oai, stream=True, extra_body=AS_IDS) if c.choices]
    first = chunks[0].choices[0]
    assert first.text == PROMPT and len(first.logprobs.tokens) == len(ids), "the echo comes with its logprobs"
    tokens, values, tops, offsets = [], [], [], []
    for c in chunks:
        if c.choices[0].logprobs:
            for acc, part in zip(
                (tokens, values, tops, offsets), flatten(c.choices[0].logprobs), strict=True
            ):
                acc.extend(part)
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert close(values, whole.token_logprobs)
    assert [t and sorted(t) for t in tops] == [t and sorted(t) for t in whole.top_logprobs]


def test_max_tokens_0_with_echo_is_the_prompt_alone(oai, hf):
    ids, _ = hf
    r = echoed(oai, max_tokens=0, extra_body=AS_IDS)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    assert len(choice.logprobs.tokens) == len(ids)
    assert_prompt_matches_hf(hf, choice.logprobs)
    chunks = [c for c in echoed(oai, max_tokens=0, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "length"
    # Without logprobs too, as OpenAI allows.
    bare = oai.completions.create(model="m", prompt=PROMPT, echo=True, max_tokens=0)
    assert (bare.choices[0].text, bare.choices[0].logprobs, bare.usage.completion_tokens) == (PROMPT, None, 0)


def test_n_samples_share_one_computation_of_the_prompt(oai, hf):
    ids, _ = hf
    r = echoed(oai, n=3, temperature=0.8, seed=5, extra_body=AS_IDS)
    assert len(r.choices) == 3
    first = r.choices[0].logprobs
    assert_prompt_matches_hf(hf, first)
    for c in r.choices[1:]:
        assert c.logprobs.tokens[: len(ids)] == first.tokens[: len(ids)]
        assert c.logprobs.token_logprobs[: len(ids)] == first.token_logprobs[: len(ids)], "the same numbers"
    streamed = {}
    for chunk in echoed(oai, n=3, temperature=0.8, seed=5, stream=True, extra_body=AS_IDS):
        for c in chunk.choices:
            if c.logprobs:
                streamed.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    assert sorted(streamed) == [0, 1, 2]
    for i, c in enumerate(r.choices):
        assert close(streamed[i], c.logprobs.token_logprobs)


def test_a_batch_of_token_prompts_scored_as_evaluation_harnesses_do(oai, hf):
    """lm-eval-harness's loglikelihood: prompts of token ids, `echo`, `logprobs`, `max_tokens: 0`."""
    ids, _ = hf
    other = ids[:9] + ids[20:]
    r = oai.completions.create(
        model="m", prompt=[ids, other], echo=True, logprobs=1, max_tokens=0, temperature=0, extra_body=AS_IDS
    )
    assert [ids_of(c.logprobs.tokens) for c in r.choices] == [ids, other]
    assert_prompt_matches_hf(hf, r.choices[0].logprobs, k=1)
    alone = echoed(oai, prompt=other, logprobs=1, max_tokens=0, extra_body=AS_IDS).choices[0].logprobs
    assert close(r.choices[1].logprobs.token_logprobs, alone.token_logprobs)
    # The first 9 tokens are the same prompt prefix: the same logprobs there.
    assert close(r.choices[1].logprobs.token_logprobs[:9], r.choices[0].logprobs.token_logprobs[:9])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids) + len(other)


@pytest.fixture(scope="module")
def chunked_engine(model_dir):
    """An engine whose steps take at most 16 tokens: the prompt goes through several prefill chunks."""
    from minisgl.launch import Engine

    config = cpu_engine_config(model_dir, num_pages=64, max_batch=4, max_step_tokens=16, max_seq_len=1024)
    with Engine(config) as running:
        yield running


def test_a_prompt_over_several_chunks_gives_the_same_numbers(oai, chunked_engine, hf):
    ids, _ = hf
    assert len(ids) > 2 * 16, "three chunks at least"
    whole = echoed(oai, extra_body=AS_IDS).choices[0].logprobs
    chunked = echoed(client_of(chunked_engine), extra_body=AS_IDS).choices[0].logprobs
    assert chunked.tokens == whole.tokens
    assert close(chunked.token_logprobs, whole.token_logprobs)
    assert_prompt_matches_hf(hf, chunked)


def test_the_zmq_door_carries_them_on_the_final_and_the_first_delta(chunked_engine, hf):
    from minisgl.client import Client

    ids, ref = hf
    sampling = {"max_tokens": 2, "temperature": 0, "prompt_logprobs": 2}
    with Client(chunked_engine.config.listen, timeout_s=300) as c:
        final = c.generate(input_ids=ids, sampling=sampling)
        deltas = [m for m in c.stream(input_ids=ids, sampling=sampling) if m["type"] == "delta"]
    assert final["prompt_token_ids"] == ids
    entries = final["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for p in range(1, len(ids)):
        assert abs(entries[p]["logprob"] - ref[p - 1, ids[p]].item()) < TOLERANCE, p
        assert len(entries[p]["top"]) == 2
    assert deltas[0]["prompt_token_ids"] == ids and len(deltas[0]["prompt_logprobs"]) == len(ids)
    assert all("prompt_logprobs" not in d for d in deltas[1:]), "only the first delta carries them"
    assert "logprobs" not in final, "the sampled tokens' were not asked for"
