"""Bad input gets a clear error reply, and the daemon keeps serving afterwards."""

from __future__ import annotations

import math

import msgpack
import pytest
from conftest import E2E_MAX_SEQ_LEN

from minisgl.client import Client

OK_REQUEST = {"text": "1, 2, 3,", "sampling": {"temperature": 0.0, "max_tokens": 3}}


def assert_still_serving(client: Client) -> None:
    final = client.generate(**OK_REQUEST)
    assert final["finish_reason"] == "length" and len(final["token_ids"]) == 3


def error_reply(client: Client, msg: dict | bytes) -> dict:
    if isinstance(msg, bytes):
        client.send_raw(msg)
    else:
        client.send(msg)
    reply = client.recv_any(timeout_s=60)
    assert reply["type"] == "error", reply
    assert reply["message"], "an error says what was wrong"
    return reply


def generate(rid: str, **fields) -> dict:
    return {"type": "generate", "rid": rid, "stream": False, **fields}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1\xc1\xc1",  # 0xc1 is never valid msgpack
        b"",
        msgpack.packb([1, 2, 3]),  # valid msgpack, not a map
        msgpack.packb({"rid": "x", "text": "no type"}),
        msgpack.packb({"type": "generate", "rid": "x", "text": 42}),  # wrong field type
        msgpack.packb({"type": "generate", "rid": 7, "text": "hi"}),
        # 200,000 nested arrays: once a stack overflow that aborted the daemon (found by proto's fuzz_peers)
        b"\x82\xa4type\xa8generate\xa4text" + b"\x91" * 200_000 + b"\xc0",
    ],
    ids=[
        "not-msgpack",
        "empty-frame",
        "not-a-map",
        "missing-type",
        "text-not-a-string",
        "rid-not-a-string",
        "deeply-nested",
    ],
)
def test_malformed_messages(client, payload):
    assert error_reply(client, payload)["code"] == "malformed"
    assert_still_serving(client)


def test_unknown_message_type(client):
    reply = error_reply(client, {"type": "launch_rockets", "rid": "r1"})
    assert reply["code"] == "unknown_type" and reply["rid"] == "r1"
    assert_still_serving(client)


@pytest.mark.parametrize("prompt", [{"text": ""}, {"input_ids": []}], ids=["text", "ids"])
def test_empty_prompt(client, prompt):
    reply = error_reply(client, generate("empty", **prompt))
    assert (reply["code"], reply["rid"]) == ("empty_prompt", "empty")
    assert_still_serving(client)


def test_prompt_longer_than_the_context(client):
    reply = error_reply(client, generate("long", input_ids=[100] * E2E_MAX_SEQ_LEN))
    assert reply["code"] == "prompt_too_long"
    reply = error_reply(client, generate("long2", text="word " * (E2E_MAX_SEQ_LEN + 10)))
    assert reply["code"] == "prompt_too_long"
    assert_still_serving(client)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": -0.5},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
        {"max_tokens": 0},
        {"max_tokens": -4},
        {"top_k": -7},
        {"stop": [""]},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_invalid_sampling_parameters(client, sampling):
    reply = error_reply(client, generate("bad", text="hello", sampling=sampling))
    assert (reply["code"], reply["rid"]) == ("invalid_params", "bad")
    assert_still_serving(client)


@pytest.mark.parametrize(
    "prompt",
    [{}, {"text": "a", "input_ids": [1, 2]}, {"input_ids": [1, -5]}, {"input_ids": [10**9]}],
    ids=["none", "two-forms", "negative-id", "id-out-of-vocab"],
)
def test_invalid_prompt_forms(client, prompt):
    reply = error_reply(client, generate("forms", **prompt))
    assert reply["code"] in ("invalid_params", "malformed")
    assert_still_serving(client)


def test_abort_of_an_unknown_request(client):
    reply = error_reply(client, {"type": "abort", "rid": "never-sent"})
    assert (reply["code"], reply["rid"]) == ("unknown_request", "never-sent")
    assert_still_serving(client)


def test_duplicate_request_id(client):
    client.submit(text="Count: 1, 2,", sampling={"temperature": 0.0, "max_tokens": 64}, rid="dup")
    # Messages from one client are handled in order, so the first request is live when this one arrives.
    client.send(generate("dup", text="again"))
    while (reply := client.next_reply("dup", timeout_s=60))["type"] == "delta":
        pass
    assert (reply["type"], reply.get("code")) == ("error", "duplicate_request"), reply
    client.abort("dup")
    while client.next_reply("dup", timeout_s=60)["type"] != "final":
        pass
    assert_still_serving(client)
