"""The HTTP API through the official `openai` package, on the session engine (the real default model, fp32 on
the CPU), against HF transformers on the same directory (issue 10, docs/http.md): logprobs equal log_softmax
of HF's logits within 1e-4, streamed and not; penalties and logit_bias change greedy tokens exactly as HF's
processors do; min_p, echo, batched prompts, stop_token_ids, skip_special_tokens; `/tokenize` and
`/detokenize`; every refusal names its param; the ZeroMQ door carries the same logprobs."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
import torch
from hf_reference import hf_greedy, hf_logprobs, load_hf_with_tokenizer

CHAT = [{"role": "user", "content": "List three fruits, then list them again."}]
CODE = "def add(a, b):\n    return"
AS_IDS = {"return_tokens_as_token_ids": True}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oai(engine):
    return openai.OpenAI(
        base_url=f"http://{engine.config.http}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def hf(model_dir):
    return load_hf_with_tokenizer(model_dir)


def chat_ids(tok) -> list[int]:
    return tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def ids_of(tokens) -> list[int]:
    """Token ids from logprob tokens written `token_id:<id>` (return_tokens_as_token_ids)."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


def assert_logprobs_match(ref: torch.Tensor, ids: list[int], sampled: list[float], tops: list[list]) -> None:
    """`sampled[i]` is ids[i]'s logprob; `tops[i]` its (id, logprob) pairs, most likely first."""
    assert len(sampled) == len(tops) == len(ids) == ref.shape[0]
    for step, (token, lp, top) in enumerate(zip(ids, sampled, tops, strict=True)):
        assert abs(lp - ref[step, token].item()) < TOLERANCE, step
        values, _ = ref[step].topk(len(top))
        assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=TOLERANCE, rtol=0), step
        for t, v in top:
            assert abs(ref[step, t].item() - v) < TOLERANCE, (step, t)


# --- logprobs -----------------------------------------------------------------------------------------------


def test_chat_logprobs_equal_hf_streamed_or_not(oai, hf):
    tok, model = hf
    kwargs = dict(model="m", messages=CHAT, max_tokens=10, temperature=0, logprobs=True, top_logprobs=5)
    r = oai.chat.completions.create(**kwargs, extra_body=AS_IDS)
    content = r.choices[0].logprobs.content
    ids = ids_of(c.token for c in content)
    assert len(ids) == r.usage.completion_tokens == 10
    ref = hf_logprobs(model, chat_ids(tok), ids)
    tops = [[(int(t.token[len("token_id:") :]), t.logprob) for t in c.top_logprobs] for c in content]
    assert_logprobs_match(ref, ids, [c.logprob for c in content], tops)
    assert all(top[0][0] == i for top, i in zip(tops, ids, strict=True)), "greedy takes the most likely token"

    # Tokens as text: each token's bytes, which together are the message's text.
    plain = oai.chat.completions.create(**kwargs)
    entries = plain.choices[0].logprobs.content
    # Another request reuses the cached prompt, so its numbers may differ in the last bits.
    assert [e.logprob for e in entries] == pytest.approx([c.logprob for c in content], abs=1e-5)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == plain.choices[0].message.content
    for e, i in zip(entries, ids, strict=True):
        assert bytes(e.bytes).decode(errors="replace") == e.token
        assert e.token == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
        assert [t.token for t in e.top_logprobs][0] == e.token

    # Streamed: the chunks' entries are the same, in order.
    chunks = oai.chat.completions.create(**kwargs, stream=True)
    streamed = [
        e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    for got, want in zip(streamed, entries, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top_logprobs], abs=1e-5
        )


def test_chat_logprobs_without_top_and_up_to_twenty(oai):
    r = oai.chat.completions.create(model="m", messages=CHAT, max_tokens=3, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert len(r.choices[0].logprobs.content) == 3
    r = oai.chat.completions.create(
        model="m", messages=CHAT, max_tokens=2, temperature=0, logprobs=True, top_logprobs=20
    )
    assert all(len(e.top_logprobs) == 20 for e in r.choices[0].logprobs.content)
    r = oai.chat.completions.create(model="m", messages=CHAT, max_tokens=2, temperature=0)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_equal_hf_with_offsets_streamed_or_not(oai, hf):
    tok, model = hf
    kwargs = dict(model="m", prompt=CODE, max_tokens=8, temperature=0, logprobs=3)
    with_ids = oai.completions.create(**kwargs, extra_body=AS_IDS).choices[0].logprobs
    ids = ids_of(with_ids.tokens)
    ref = hf_logprobs(model, tok(CODE).input_ids, ids)
    tops = [[(int(k[len("token_id:") :]), v) for k, v in top.items()] for top in with_ids.top_logprobs]
    assert_logprobs_match(ref, ids, with_ids.token_logprobs, tops)

    choice = oai.completions.create(**kwargs).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs == pytest.approx(with_ids.token_logprobs, abs=1e-5)
    assert [len(top) for top in lp.top_logprobs] == [3] * 8
    # An extension past OpenAI's 5.
    wide = oai.completions.create(**{**kwargs, "logprobs": 20, "max_tokens": 2}).choices[0].logprobs
    assert [len(top) for top in wide.top_logprobs] == [20, 20]

    chunks = list(oai.completions.create(**kwargs, stream=True))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lp.tokens
    assert [o for p in pieces for o in p.text_offset] == lp.text_offset
    assert [x for p in pieces for x in p.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


def test_the_zmq_door_carries_the_same_logprobs(oai, client):
    http = oai.completions.create(
        model="m", prompt=CODE, max_tokens=5, temperature=0, logprobs=2, extra_body=AS_IDS
    )
    lp = http.choices[0].logprobs
    final = client.generate(text=CODE, sampling={"temperature": 0.0, "max_tokens": 5, "logprobs": 2})
    assert final["token_ids"] == ids_of(lp.tokens)
    assert len(final["logprobs"]) == len(final["token_ids"])
    # The same numbers: f32 on the ZeroMQ wire, their shortest decimal form in JSON.
    assert [e["logprob"] for e in final["logprobs"]] == pytest.approx(lp.token_logprobs, abs=1e-5)
    for entry, top in zip(final["logprobs"], lp.top_logprobs, strict=True):
        assert list(top) == [f"token_id:{i}" for i, _ in entry["top"]]
        assert list(top.values()) == pytest.approx([v for _, v in entry["top"]], abs=1e-5)
    # Streamed deltas carry one entry per token id, together the final's.
    replies = list(client.stream(text=CODE, sampling={"temperature": 0.0, "max_tokens": 5, "logprobs": 2}))
    deltas = [m for m in replies if m["type"] == "delta"]
    assert all(len(d["logprobs"]) == len(d["token_ids"]) for d in deltas)
    assert [e for d in deltas for e in d["logprobs"]] == replies[-1]["logprobs"]
    assert [e["top"][0][0] for e in replies[-1]["logprobs"]] == final["token_ids"]
    plain = client.generate(text=CODE, sampling={"temperature": 0.0, "max_tokens": 2})
    assert "logprobs" not in plain, "left off when not asked for"


# --- penalties, logit bias, min_p --------------------------------------------------------------------------


def generated_ids(response) -> list[int]:
    return ids_of(response.choices[0].logprobs.tokens)


def test_penalties_and_logit_bias_change_greedy_tokens_as_hf_processors_do(oai, hf):
    tok, model = hf
    new = 12
    # A list repeats its words and commas: each penalty has something to act on.
    text = "The list of fruits: apple, banana, apple, banana,"
    prompt = tok(text).input_ids
    base = dict(model="m", prompt=text, max_tokens=new, temperature=0, logprobs=0, extra_body=AS_IDS)
    plain = generated_ids(oai.completions.create(**base))
    assert plain == hf_greedy(model, prompt, new, stop_at_eos=True)
    # The bias pushes a token the greedy output does not start with.
    favoured = tok(" x").input_ids[0]
    cases = [
        dict(presence=-2.0),
        dict(presence=2.0, frequency=0.5),
        dict(frequency=1.2),
        dict(repetition=1.5),
        dict(bias={favoured: 30.0}),
        dict(bias={plain[0]: -100.0}, presence=0.5, frequency=0.5, repetition=1.3),
    ]
    for case in cases:
        presence, frequency = case.get("presence", 0.0), case.get("frequency", 0.0)
        repetition, bias = case.get("repetition", 1.0), case.get("bias", {})
        response = oai.completions.create(
            **{**base, "extra_body": {**AS_IDS, "repetition_penalty": repetition}},
            presence_penalty=presence,
            frequency_penalty=frequency,
            logit_bias={str(t): b for t, b in bias.items()},
        )
        got = generated_ids(response)
        want = hf_greedy(
            model,
            prompt,
            new,
            stop_at_eos=True,
            bias=bias,
            repetition=repetition,
            presence=presence,
            frequency=frequency,
        )
        assert got == want, case
        assert got != plain, f"{case} changed nothing"


def test_chat_penalties_match_hf_too(oai, hf):
    tok, model = hf
    r = oai.chat.completions.create(
        model="m",
        messages=CHAT,
        max_tokens=16,
        temperature=0,
        presence_penalty=0.8,
        frequency_penalty=0.4,
        logprobs=True,
        extra_body={**AS_IDS, "repetition_penalty": 1.2},
    )
    got = ids_of(e.token for e in r.choices[0].logprobs.content)
    assert got == hf_greedy(
        model, chat_ids(tok), 16, stop_at_eos=True, repetition=1.2, presence=0.8, frequency=0.4
    )


def test_min_p_of_one_keeps_only_the_most_likely_token(oai):
    base = dict(model="m", prompt=CODE, max_tokens=12, seed=7)
    greedy = oai.completions.create(**base, temperature=0).choices[0].text
    hot = oai.completions.create(**base, temperature=1.8).choices[0].text
    kept = oai.completions.create(**base, temperature=1.8, extra_body={"min_p": 1.0}).choices[0].text
    assert kept == greedy and hot != greedy


# --- request fields -----------------------------------------------------------------------------------------


def test_echo_puts_the_prompt_in_front_streamed_or_not(oai, hf):
    tok, _ = hf
    base = dict(model="m", max_tokens=6, temperature=0)
    plain = oai.completions.create(**base, prompt=CODE).choices[0].text
    echoed = oai.completions.create(**base, prompt=CODE, echo=True).choices[0].text
    assert echoed == CODE + plain
    ids = tok(CODE).input_ids
    assert oai.completions.create(**base, prompt=ids, echo=True).choices[0].text == tok.decode(ids) + plain
    chunks = [c for c in oai.completions.create(**base, prompt=CODE, echo=True, stream=True) if c.choices]
    assert chunks[0].choices[0].text == CODE
    assert "".join(c.choices[0].text for c in chunks) == echoed


def test_a_batch_of_prompts_gives_n_choices_per_prompt_in_order(oai):
    base = dict(model="m", max_tokens=6, temperature=0.9, seed=11, n=2)
    prompts = [CODE, "The capital of France is", "1, 2, 3,"]
    batch = oai.completions.create(**base, prompt=prompts)
    assert [c.index for c in batch.choices] == list(range(6))
    singles = [oai.completions.create(**base, prompt=p) for p in prompts]
    assert [c.text for c in batch.choices] == [c.text for s in singles for c in s.choices]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    texts = {i: "" for i in range(6)}
    for chunk in oai.completions.create(**base, prompt=prompts, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert list(texts.values()) == [c.text for c in batch.choices]


def test_stop_token_ids_end_the_choice(oai):
    base = dict(model="m", prompt=CODE, max_tokens=8, temperature=0, logprobs=0, extra_body=AS_IDS)
    ids = generated_ids(oai.completions.create(**base))
    r = oai.completions.create(**{**base, "extra_body": {**AS_IDS, "stop_token_ids": [ids[2]]}})
    assert r.choices[0].finish_reason == "stop" and generated_ids(r) == ids[:3]
    assert r.usage.completion_tokens == 3


def test_skip_special_tokens_false_keeps_them_in_the_text(oai):
    base = dict(model="m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=40, temperature=0)
    kept = oai.chat.completions.create(**base, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    skipped = oai.chat.completions.create(**base, extra_body={"ignore_eos": True})
    text = kept.choices[0].message.content
    assert "<|im_end|>" in text
    assert text.replace("<|im_end|>", "").replace("<|endoftext|>", "") == skipped.choices[0].message.content


def test_tokenize_and_detokenize_agree_with_hf(engine, hf):
    tok, _ = hf

    def post(path: str, body: dict) -> tuple[int, dict]:
        host, port = engine.config.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    status, body = post("/tokenize", {"model": "m", "prompt": CODE})
    assert status == 200 and body["tokens"] == tok(CODE).input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096
    status, body = post("/tokenize", {"messages": CHAT})
    assert status == 200 and body["tokens"] == chat_ids(tok)
    status, no_prompt = post("/tokenize", {"messages": CHAT, "add_generation_prompt": False})
    assert (
        no_prompt["tokens"]
        == tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    status, back = post("/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == tok.decode(body["tokens"])
    # The count is what the completion is charged for the same messages.
    r = openai.OpenAI(base_url=f"http://{engine.config.http}/v1", api_key="x").chat.completions.create(
        model="m", messages=CHAT, max_tokens=1
    )
    assert r.usage.prompt_tokens == body["count"]
    status, body = post("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages[0].role"


# --- refusals -----------------------------------------------------------------------------------------------

VOCAB = 151936  # the model's, past the tokenizer's 151665


@pytest.mark.parametrize(
    "endpoint,kwargs,code,param",
    [
        ("chat", dict(extra_body={"frobnicate": 1}), "unknown_parameter", "frobnicate"),
        ("chat", dict(messages=[{"role": "wizard", "content": "x"}]), "invalid_params", "messages[0].role"),
        ("chat", dict(messages=[{"role": "user"}]), "invalid_params", "messages[0].content"),
        (
            "chat",
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "invalid_params",
            "messages[0].content[0].type",
        ),
        ("chat", dict(logprobs=True, top_logprobs=21), "invalid_params", "top_logprobs"),
        ("chat", dict(top_logprobs=3), "invalid_params", "top_logprobs"),
        ("chat", dict(presence_penalty=2.5), "invalid_params", "presence_penalty"),
        ("chat", dict(frequency_penalty=-3), "invalid_params", "frequency_penalty"),
        ("chat", dict(extra_body={"repetition_penalty": 0}), "invalid_params", "repetition_penalty"),
        ("chat", dict(extra_body={"min_p": 1.5}), "invalid_params", "min_p"),
        ("chat", dict(logit_bias={"5": 101}), "invalid_params", "logit_bias"),
        ("chat", dict(logit_bias={str(VOCAB): 1}), "invalid_params", "logit_bias"),
        ("chat", dict(logit_bias={str(i): 1 for i in range(301)}), "invalid_params", "logit_bias"),
        ("chat", dict(extra_body={"min_tokens": 3}), "invalid_params", "min_tokens"),
        (
            "chat",
            dict(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice="required",
                extra_body={"regex": "a"},
            ),
            "invalid_params",
            "tool_choice",
        ),
        ("chat", dict(response_format={"type": "yaml"}), "invalid_params", "response_format.type"),
        ("chat", dict(extra_body={"regex": "a("}), "invalid_params", "regex"),
        ("completions", dict(max_tokens=0), "invalid_params", "max_tokens"),
        ("completions", dict(logprobs=21), "invalid_params", "logprobs"),
        ("completions", dict(best_of=3), "unsupported_parameter", "best_of"),
        ("completions", dict(suffix="x"), "unsupported_parameter", "suffix"),
        ("completions", dict(extra_body={"top_logprobs": 2}), "unknown_parameter", "top_logprobs"),
        ("completions", dict(prompt=[1, VOCAB]), "invalid_params", "prompt"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_refusal_is_a_400_naming_its_param(oai, endpoint, kwargs, code, param):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            oai.chat.completions.create(**{"model": "m", "messages": CHAT, "max_tokens": 2, **kwargs})
        else:
            oai.completions.create(**{"model": "m", "prompt": "x", "max_tokens": 2, **kwargs})
    assert e.value.status_code == 400
    assert (e.value.code, e.value.param) == (code, param), e.value.body
    assert e.value.body["message"]
    # The server is still serving.
    assert oai.completions.create(model="m", prompt="1, 2,", max_tokens=1).usage.completion_tokens == 1
