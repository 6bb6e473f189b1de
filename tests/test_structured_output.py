"""Structured output and min_tokens through the official `openai` package, on the session engine (the real
default model, fp32 on the CPU; issue 10, docs/http.md): json_schema output validates against its schema for
20 varied prompts and schemas (run at once, as one batch), json_object parses, a regex and a Lark grammar are
followed, streamed and not, over both endpoints and the ZeroMQ door; min_tokens holds EOS back; each bad
constraint is a 400 naming its param; and an unconstrained request beside constrained ones gives exactly the
tokens it gives alone."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest


@pytest.fixture(scope="module")
def oai(engine):
    return openai.OpenAI(
        base_url=f"http://{engine.config.http}/v1", api_key="unused", max_retries=0, timeout=300
    )


def name(max_length: int = 24) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


# (prompt, schema): nested objects, arrays, enums, numbers with bounds, optional fields, booleans, nulls.
CASES = [
    (
        "Describe a cat as JSON.",
        {
            "type": "object",
            "properties": {"name": name(), "age": {"type": "integer", "minimum": 0, "maximum": 30}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "Pick a primary color.",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a city and its country.",
        {
            "type": "object",
            "properties": {"city": name(), "country": name()},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "List up to three fruits.",
        {
            "type": "object",
            "properties": {"fruits": {"type": "array", "items": name(16), "minItems": 1, "maxItems": 3}},
            "required": ["fruits"],
            "additionalProperties": False,
        },
    ),
    (
        "A point in 2D.",
        {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        },
    ),
    (
        "Is water wet? Answer as JSON.",
        {
            "type": "object",
            "properties": {"answer": {"type": "boolean"}, "confidence": {"enum": ["low", "medium", "high"]}},
            "required": ["answer", "confidence"],
            "additionalProperties": False,
        },
    ),
    (
        "A user with an address.",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "name": name(),
                        "address": {
                            "type": "object",
                            "properties": {
                                "street": name(),
                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            },
                            "required": ["street", "zip"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "address"],
                    "additionalProperties": False,
                }
            },
            "required": ["user"],
            "additionalProperties": False,
        },
    ),
    (
        "Two todo items.",
        {
            "type": "object",
            "properties": {
                "todos": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {"title": name(20), "done": {"type": "boolean"}},
                        "required": ["title", "done"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["todos"],
            "additionalProperties": False,
        },
    ),
    (
        "Rate this movie from 1 to 5.",
        {
            "type": "object",
            "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["stars"],
            "additionalProperties": False,
        },
    ),
    (
        "The HTTP status of a missing page.",
        {
            "type": "object",
            "properties": {"status": {"enum": [200, 301, 404, 500]}, "reason": name()},
            "required": ["status", "reason"],
            "additionalProperties": False,
        },
    ),
    (
        "A book.",
        {
            "type": "object",
            "properties": {
                "title": name(),
                "authors": {"type": "array", "items": name(), "minItems": 1, "maxItems": 2},
                "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
            },
            "required": ["title", "authors", "year"],
            "additionalProperties": False,
        },
    ),
    ("A weekday.", {"type": "string", "enum": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}),
    (
        "Three small prime numbers.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 2, "maximum": 50},
            "minItems": 3,
            "maxItems": 3,
        },
    ),
    (
        "A product with a price.",
        {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "price": {"type": "number", "minimum": 0},
                "currency": {"enum": ["USD", "EUR"]},
            },
            "required": ["sku", "price", "currency"],
            "additionalProperties": False,
        },
    ),
    (
        "An optional nickname.",
        {
            "type": "object",
            "properties": {"name": name(), "nickname": {"anyOf": [name(), {"type": "null"}]}},
            "required": ["name", "nickname"],
            "additionalProperties": False,
        },
    ),
    (
        "A chess move.",
        {
            "type": "object",
            "properties": {
                "piece": {"enum": ["king", "queen", "rook", "bishop", "knight", "pawn"]},
                "to": {"type": "string", "pattern": "^[a-h][1-8]$"},
            },
            "required": ["piece", "to"],
            "additionalProperties": False,
        },
    ),
    (
        "A matrix of 2 by 2 small integers.",
        {
            "type": "array",
            "minItems": 2,
            "maxItems": 2,
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 2,
                "items": {"type": "integer", "minimum": -9, "maximum": 9},
            },
        },
    ),
    (
        "A log entry.",
        {
            "type": "object",
            "properties": {
                "level": {"enum": ["debug", "info", "warn", "error"]},
                "message": name(30),
                "tags": {"type": "array", "items": {"enum": ["db", "net", "ui"]}, "maxItems": 2},
            },
            "required": ["level", "message", "tags"],
            "additionalProperties": False,
        },
    ),
    (
        "A recipe step.",
        {
            "type": "object",
            "properties": {
                "step": {"type": "integer", "minimum": 1, "maximum": 9},
                "action": {"enum": ["chop", "boil", "fry", "mix"]},
                "minutes": {"type": "number", "minimum": 0, "maximum": 60},
            },
            "required": ["step", "action", "minutes"],
            "additionalProperties": False,
        },
    ),
    (
        "A shape.",
        {
            "type": "object",
            "properties": {
                "shape": {
                    "oneOf": [
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "circle"},
                                "radius": {"type": "integer", "minimum": 1, "maximum": 9},
                            },
                            "required": ["kind", "radius"],
                            "additionalProperties": False,
                        },
                        {
                            "type": "object",
                            "properties": {
                                "kind": {"const": "square"},
                                "side": {"type": "integer", "minimum": 1, "maximum": 9},
                            },
                            "required": ["kind", "side"],
                            "additionalProperties": False,
                        },
                    ]
                }
            },
            "required": ["shape"],
            "additionalProperties": False,
        },
    ),
]


def chat(oai, content: str, **kwargs):
    messages = [{"role": "user", "content": content}]
    return oai.chat.completions.create(model="m", messages=messages, temperature=0, **kwargs)


def streamed_text(stream) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += (
                getattr(choice, "delta", None) and (choice.delta.content or "") or getattr(choice, "text", "")
            )
            reason = choice.finish_reason or reason
    return text, reason


def test_json_schema_output_validates_for_twenty_prompts_and_schemas(oai):
    assert len(CASES) == 20

    def run(i: int):
        prompt, schema = CASES[i]
        fmt = {"type": "json_schema", "json_schema": {"name": f"case{i}", "schema": schema, "strict": True}}
        kwargs = dict(response_format=fmt, max_tokens=160)
        if i % 4 == 0:  # every fourth streamed
            return streamed_text(chat(oai, prompt, stream=True, **kwargs))
        r = chat(oai, prompt, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(len(CASES)) as pool:
        results = list(pool.map(run, range(len(CASES))))
    for (prompt, schema), (text, reason) in zip(CASES, results, strict=True):
        assert reason == "stop", (prompt, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_parses_streamed_and_not(oai):
    fmt = {"type": "json_object"}
    r = chat(oai, "Give me a JSON object describing a dog.", response_format=fmt, max_tokens=100)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.choices[0].finish_reason == "stop"
    text, reason = streamed_text(
        chat(oai, "A JSON object with one key.", response_format=fmt, max_tokens=100, stream=True)
    )
    assert isinstance(json.loads(text), dict) and reason == "stop"


PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"


def test_a_regex_is_matched_by_the_whole_text_on_both_endpoints(oai):
    r = oai.completions.create(
        model="m", prompt="Call me at", max_tokens=30, temperature=0, extra_body={"regex": PHONE}
    )
    assert re.fullmatch(PHONE, r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    stream = oai.completions.create(
        model="m",
        prompt="Office phone:",
        max_tokens=30,
        temperature=0.8,
        seed=3,
        stream=True,
        extra_body={"regex": PHONE},
    )
    text, reason = streamed_text(stream)
    assert re.fullmatch(PHONE, text) and reason == "stop", text
    r = chat(oai, "Reply yes or no: is the sky green?", max_tokens=10, extra_body={"regex": "(yes|no)"})
    assert r.choices[0].message.content in ("yes", "no")


# Lark (llguidance's dialect): a sum of small numbers, and the equivalent regex to check what came out.
SUM = """
start: expr
expr: NUMBER (" + " NUMBER)+
NUMBER: /[1-9][0-9]?/
"""
SUM_RE = r"[1-9][0-9]?( \+ [1-9][0-9]?)+"


def test_a_lark_grammar_is_followed_streamed_and_not(oai):
    body = {"grammar": SUM}
    r = chat(oai, "Write a sum of three numbers.", max_tokens=30, extra_body=body)
    assert re.fullmatch(SUM_RE, r.choices[0].message.content), r.choices[0].message.content
    text, _ = streamed_text(
        oai.completions.create(
            model="m", prompt="2 + 2 =", max_tokens=12, temperature=0, stream=True, extra_body=body
        )
    )
    # A length cut may stop it mid-sum, but never off the grammar: a prefix of a sentence of it.
    assert re.fullmatch(SUM_RE, text) or re.fullmatch(r"[1-9][0-9]?( \+ [1-9][0-9]?)*( \+ ?)?", text), text


def test_min_tokens_holds_eos_back(oai):
    kwargs = dict(max_tokens=40)
    short = chat(oai, "Say OK.", **kwargs)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 12, short.choices[0].message.content
    longer = chat(oai, "Say OK.", extra_body={"min_tokens": n + 8}, **kwargs)
    assert longer.usage.completion_tokens >= n + 8
    r = oai.completions.create(
        model="m",
        prompt="def f():\n    return 1\n",
        max_tokens=20,
        temperature=0,
        extra_body={"min_tokens": 20},
    )
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


def error_of(call) -> tuple[int, str | None, str]:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    body = e.value.body or {}
    body = body.get("error", body) if isinstance(body, dict) else {}
    return e.value.status_code, body.get("param"), body.get("message", "")


def test_bad_constraints_are_refused_naming_the_param(oai):
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    status, param, message = error_of(lambda: chat(oai, "x", response_format=bad_schema))
    assert (status, param) == (400, "response_format") and message.startswith("json_schema:"), message
    status, param, _ = error_of(
        lambda: chat(oai, "x", response_format={"type": "json_object"}, extra_body={"regex": "a"})
    )
    assert (status, param) == (400, "regex")
    status, param, message = error_of(lambda: chat(oai, "x", extra_body={"regex": "a("}))
    assert (status, param) == (400, "regex") and message.startswith("regex:")
    status, param, _ = error_of(
        lambda: oai.completions.create(model="m", prompt="x", extra_body={"grammar": "start: missing_rule"})
    )
    assert (status, param) == (400, "grammar")
    status, param, _ = error_of(lambda: chat(oai, "x", response_format={"type": "yaml"}))
    assert (status, param) == (400, "response_format.type")
    status, param, _ = error_of(lambda: chat(oai, "x", max_tokens=3, extra_body={"min_tokens": 5}))
    assert (status, param) == (400, "min_tokens")
    # The engine still serves.
    assert chat(oai, "Hi", max_tokens=2).usage.completion_tokens == 2


def test_an_unconstrained_request_beside_constrained_ones_gives_its_tokens_alone(oai):
    def plain():
        r = oai.completions.create(
            model="m",
            prompt="def fibonacci(n):",
            max_tokens=16,
            temperature=0,
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True},
        )
        return r.choices[0].logprobs.tokens

    alone = plain()
    fmt = {"type": "json_object"}
    with ThreadPoolExecutor(5) as pool:
        constrained = [
            pool.submit(chat, oai, f"A JSON object number {i}.", response_format=fmt, max_tokens=24)
            for i in range(4)
        ]
        beside = pool.submit(plain)
        outs = [f.result() for f in constrained]
        assert beside.result() == alone
    for r in outs:
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_the_zeromq_door_takes_constraints_in_the_sampling_map(client):
    final = client.generate(
        text="Call me at", sampling={"temperature": 0.0, "max_tokens": 30, "regex": PHONE}
    )
    assert re.fullmatch(PHONE, final["text"]) and final["finish_reason"] == "stop", final
    schema = CASES[1][1]
    final = client.generate(
        text="My favourite color:", sampling={"temperature": 0.0, "max_tokens": 30, "json_schema": schema}
    )
    jsonschema.validate(json.loads(final["text"]), schema)
    from minisgl.client.client import MinisglError

    with pytest.raises(MinisglError) as e:
        client.generate(text="x", sampling={"regex": "a(", "max_tokens": 3})
    assert e.value.code == "invalid_params" and "regex" in str(e.value)
