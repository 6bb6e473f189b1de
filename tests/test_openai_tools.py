"""Tool calling through the official `openai` package, on the session engine (the real default model,
Qwen2.5-Coder-0.5B-Instruct, fp32 on the CPU, greedy): the tools reach the chat template exactly as HF's
`apply_chat_template` renders them, the model's call comes back as `tool_calls` whose arguments validate
against the tool's schema, the same calls streamed, a call and its result rendered into a second turn as HF
renders them, `tool_choice: "none"`, and every malformed tool field refused with a 400 naming it
(docs/http.md, "Tool calls")."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
# The call this model writes for ASK is 24 tokens; room for it and its end.
GREEDY = dict(model="m", temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def oai(engine):
    return openai.OpenAI(
        base_url=f"http://{engine.config.http}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def first_turn(oai):
    return oai.chat.completions.create(messages=ASK, tools=[WEATHER], **GREEDY)


RESULT = '{"temperature": 18, "condition": "sunny"}'


def second_turn(call) -> list[dict]:
    """ASK, the model's call as an OpenAI client sends it back (arguments a JSON string), and its result."""
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": RESULT},
    ]


@pytest.fixture(scope="module")
def followups(engine, oai, first_turn):
    """The requests that follow the first turn, run at once (one batch, their prompts cached): streamed,
    `tool_choice: "none"`, the second turn, and the same request through the ZeroMQ door."""
    from minisgl.client import Client

    call = first_turn.choices[0].message.tool_calls[0]

    def zmq():
        with Client(engine.config.listen, timeout_s=300) as c:
            return list(
                c.stream(messages=ASK, tools=[WEATHER], sampling={"temperature": 0.0, "max_tokens": 40})
            )

    jobs = {
        "stream": lambda: list(
            oai.chat.completions.create(messages=ASK, tools=[WEATHER], stream=True, **GREEDY)
        ),
        "none": lambda: oai.chat.completions.create(
            messages=ASK, tools=[WEATHER], tool_choice="none", **GREEDY
        ),
        "second": lambda: oai.chat.completions.create(messages=second_turn(call), tools=[WEATHER], **GREEDY),
        "zmq": zmq,
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def hf_ids(tok, messages, tools) -> list[int]:
    ids = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(ids["input_ids"])


def our_ids(engine, messages, tools) -> list[int]:
    """The prompt a chat request of these messages and tools is given, from `/tokenize`."""
    host, port = engine.config.http.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        body = json.dumps({"messages": messages, "tools": tools})
        conn.request("POST", "/tokenize", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
        assert resp.status == 200, reply
        return reply["tokens"]
    finally:
        conn.close()


def check_schema(value, schema: dict, path: str = "arguments") -> None:
    """The JSON-schema keywords WEATHER uses, checked strictly; any other keyword fails the test rather than
    passing unchecked."""
    known = {"type", "properties", "required", "enum", "description"}
    assert set(schema) <= known, f"{path}: keywords this checker does not know: {set(schema) - known}"
    types = {"object": dict, "string": str}
    if "type" in schema:
        assert isinstance(value, types[schema["type"]]), f"{path}: {value!r} is not a {schema['type']}"
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    for key in schema.get("required", []):
        assert key in value, f"{path}: {key} is required"
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            check_schema(value[key], sub, f"{path}.{key}")
    if "properties" in schema:
        assert set(value) <= set(schema["properties"]), (
            f"{path}: unknown keys {set(value) - set(schema['properties'])}"
        )


def test_the_model_calls_the_tool_and_its_arguments_validate(engine, first_turn, tok):
    choice = first_turn.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None, "no text outside the call, and no markup"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.id.startswith("call_") and len(call.id) == 29
    arguments = json.loads(call.function.arguments)
    check_schema(arguments, WEATHER["function"]["parameters"])
    assert arguments["city"] == "Paris"
    # The prompt is the template's with the tools: exactly HF's rendering.
    ids = our_ids(engine, ASK, [WEATHER])
    assert ids == hf_ids(tok, ASK, [WEATHER])
    assert first_turn.usage.prompt_tokens == len(ids)


def test_streamed_deltas_assemble_to_the_same_calls(followups, first_turn):
    content, calls, reasons = [], {}, []
    for chunk in followups["stream"]:
        choice = chunk.choices[0]
        content.append(choice.delta.content or "")
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert call["id"] is None, "the id comes once, first"
                call["id"] = d.id
                assert d.type == "function" and d.function.name and d.function.arguments == ""
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        reasons.append(choice.finish_reason)
    assert "".join(content) == "", "no call markup leaks into the content"
    assert [r for r in reasons if r] == ["tool_calls"]
    want = first_turn.choices[0].message.tool_calls
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in want
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_a_tool_result_goes_back_into_a_second_turn(engine, followups, first_turn, tok):
    call = first_turn.choices[0].message.tool_calls[0]
    r = followups["second"]
    # This small model tends to call again rather than answer; whatever it does must come back well formed.
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls")
    for again in choice.message.tool_calls or []:
        check_schema(json.loads(again.function.arguments), WEATHER["function"]["parameters"])
    # The assistant's call (arguments given as OpenAI's JSON string) and the result render as HF renders them
    # with the arguments as an object, which is what the template expects.
    as_hf = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "content": RESULT},
    ]
    ids = our_ids(engine, second_turn(call), [WEATHER])
    assert ids == hf_ids(tok, as_hf, [WEATHER])
    assert r.usage.prompt_tokens == len(ids)


def test_tool_choice_none_renders_the_tools_and_parses_nothing(followups, first_turn):
    r = followups["none"]
    choice = r.choices[0]
    assert r.usage.prompt_tokens == first_turn.usage.prompt_tokens, "the same prompt, tools included"
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    # Greedy gives the same output as with "auto", left as the model wrote it: the call's JSON (in this
    # model's `<tool_call>` tags or bare), which is the call "auto" parsed.
    call = first_turn.choices[0].message.tool_calls[0]
    raw = choice.message.content.replace("<tool_call>", "").replace("</tool_call>", "")
    written = json.loads(raw)
    assert written == {"name": call.function.name, "arguments": json.loads(call.function.arguments)}


def test_the_zmq_door_renders_the_tools_and_returns_the_same_calls(followups, first_turn):
    replies = followups["zmq"]
    final = replies[-1]
    assert final["type"] == "final" and final["finish_reason"] == "stop"
    assert final["prompt_tokens"] == first_turn.usage.prompt_tokens
    want = first_turn.choices[0].message.tool_calls
    assert [(c["index"], c["name"], c["arguments"]) for c in final["tool_calls"]] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(want)
    ]
    assert final["text"] == "", "the text is the content outside the calls"
    streamed = [c for m in replies[:-1] for c in m.get("tool_calls", [])]
    assert streamed == final["tool_calls"], "the deltas carry the calls, ids included"
    assert "".join(m["text"] for m in replies[:-1]) == ""


BAD_TOOL_REQUESTS = [
    ({"tools": {"get_weather": WEATHER}}, "invalid_params", "tools"),
    (
        {"tools": [WEATHER, {"type": "retrieval", "function": {"name": "f"}}]},
        "invalid_params",
        "tools[1].type",
    ),
    ({"tools": [WEATHER, {"type": "function", "function": {}}]}, "invalid_params", "tools[1].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "invalid_params", "tools[1].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
        "invalid_params",
        "tools[0].function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "params": {}}}]},
        "unknown_parameter",
        "tools[0].function.params",
    ),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "invalid_params", "tool_choice"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
        "invalid_params",
        "tool_choice.function.name",
    ),
    (
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "invalid_params",
        "tool_choice",
    ),
    ({"tool_choice": "required"}, "invalid_params", "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "invalid_params", "parallel_tool_calls"),
    ({"functions": [WEATHER["function"]]}, "unsupported_parameter", "functions"),
    (
        {"messages": [*ASK, {"role": "tool", "content": "18 degrees"}]},
        "invalid_params",
        "messages[1].tool_call_id",
    ),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{city: Paris}"},
                        }
                    ],
                },
            ]
        },
        "invalid_params",
        "messages[1].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize("fields,code,param", BAD_TOOL_REQUESTS)
def test_each_malformed_tool_field_is_a_400_naming_it(oai, fields, code, param):
    body = {"messages": ASK, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="m", max_tokens=1, **body)
    assert (e.value.status_code, e.value.code, e.value.param) == (400, code, param), e.value.message


def test_the_engine_still_serves_after_the_refusals(oai):
    r = oai.chat.completions.create(model="m", messages=ASK, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"


TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
        },
    },
}
# Prompts that ask for no tool: only the forced choice makes the model call one.
OFF_TOPIC = ["Tell me a joke about cats.", "Write a haiku about rain.", "What is 17 times 3?"]


def test_a_forced_choice_always_gives_a_valid_call(oai):
    """`required` (any tool; one call, as `parallel_tool_calls: false` asks) and a named function, sampled at
    temperature 0.8 with several seeds on prompts that ask for no tool: every choice ends in one call whose
    arguments validate. (With parallel calls allowed the model decides how many it writes, and may write calls
    until `max_tokens`: each of them is still valid, but the choice ends with "length".)"""
    tools = {"get_weather": WEATHER, "get_time": TIME}
    named = {"type": "function", "function": {"name": "get_time"}}
    jobs = [
        (choice, prompt, seed) for choice in ("required", named) for prompt in OFF_TOPIC for seed in (1, 2)
    ]

    def ask(job):
        choice, prompt, seed = job
        return oai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": prompt}],
            tools=list(tools.values()),
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0.8,
            seed=seed,
            max_tokens=120,
        )

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(ask, jobs))
    for (choice, prompt, seed), r in zip(jobs, replies, strict=True):
        c = r.choices[0]
        where = f"{choice} / {prompt!r} / seed {seed}: {c.message}"
        assert c.finish_reason == "tool_calls", where
        [call] = c.message.tool_calls
        assert c.message.content is None, where
        if choice != "required":
            assert call.function.name == "get_time", where
        check_schema(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])


def test_a_named_choice_streams_its_call(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        oai.chat.completions.create(
            messages=[{"role": "user", "content": OFF_TOPIC[0]}],
            tools=[WEATHER, TIME],
            tool_choice=named,
            stream=True,
            **{**GREEDY, "max_tokens": 80},
        )
    )
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    check_schema(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks).strip()
