"""The message builders: keys and defaults as in docs/protocol.md."""

from __future__ import annotations

import msgpack
import pytest

from minisgl.proto import messages


def test_generate_takes_exactly_one_prompt_form():
    assert messages.generate("a", text="hi") == {"type": "generate", "rid": "a", "text": "hi", "stream": True}
    chat = [{"role": "user", "content": "hi"}]
    assert messages.generate("a", messages=chat, stream=False)["messages"] == chat
    assert messages.generate("a", input_ids=[1, 2], sampling={"seed": 3})["sampling"] == {"seed": 3}
    for bad in ({}, {"text": "x", "input_ids": [1]}, {"text": "x", "messages": chat}):
        with pytest.raises(ValueError, match="exactly one"):
            messages.generate("a", **bad)


def test_n_is_sent_only_when_it_is_not_one():
    assert "n" not in messages.generate("a", text="hi", n=1)
    assert messages.generate("a", text="hi", n=3)["n"] == 3
    assert list(messages.generate("a", text="hi", sampling={}, n=2)) == [
        "type",
        "rid",
        "text",
        "sampling",
        "stream",
        "n",
    ]


def test_generate_refuses_unknown_sampling_keys():
    with pytest.raises(ValueError, match="max_new_tokens"):
        messages.generate("a", text="x", sampling={"max_new_tokens": 3})


def test_a_built_message_survives_msgpack():
    msg = messages.generate("a", text="é", sampling={"temperature": 0.5, "seed": 2**64 - 1})
    assert msgpack.unpackb(msgpack.packb(msg)) == msg


def test_constants_match_the_protocol():
    assert (messages.RING_STEP, messages.RING_RESULT) == (1, 2)
    assert (messages.STEP_EXTEND, messages.STEP_DECODE, messages.STEP_SHUTDOWN) == (0, 1, 2)
    assert (messages.RESULT_OK, messages.RESULT_FAILED) == (0, 1)
    assert messages.FINISH_REASONS == ("stop", "length", "abort", "error", "memory")
    assert set(messages.ERROR_CODES) == {
        "malformed",
        "unknown_type",
        "invalid_params",
        "empty_prompt",
        "prompt_too_long",
        "unknown_request",
        "duplicate_request",
        "shutting_down",
        "overloaded",
        "too_many_requests",
    }
    assert messages.abort("r") == {"type": "abort", "rid": "r"}
    assert messages.info() == {"type": "info"} and messages.ready() == {"type": "ready"}
    assert messages.keepalive() == {"type": "keepalive"}


def test_the_sampling_options_are_sent_only_when_on_in_the_protocols_order():
    assert messages.sampling() == messages.SAMPLING_DEFAULTS
    assert messages.sampling(logprobs=None, min_p=0.0, logit_bias=[], skip_special_tokens=True) == (
        messages.SAMPLING_DEFAULTS
    )
    wire = messages.sampling(skip_special_tokens=False, logit_bias=[(5, 1.0)], logprobs=0, seed=1)
    assert list(wire) == [*messages.SAMPLING_DEFAULTS, "logit_bias", "logprobs", "skip_special_tokens"]
    assert (wire["seed"], wire["logit_bias"], wire["logprobs"]) == (1, [[5, 1.0]], 0)
    assert messages.generate("a", text="x", sampling={"min_p": 0.1})["sampling"] == {"min_p": 0.1}
    with pytest.raises(ValueError, match="top_logprobs"):
        messages.sampling(top_logprobs=3)


def test_the_offline_sampling_params_write_the_same_map():
    from minisgl.client.llm import SamplingParams

    assert SamplingParams().to_wire() == messages.SAMPLING_DEFAULTS
    params = SamplingParams(
        temperature=0.0, logit_bias={7: -100}, logprobs=2, prompt_logprobs=0, repetition_penalty=1.2
    )
    assert params.to_wire() == messages.sampling(
        temperature=0.0, logit_bias=[(7, -100.0)], logprobs=2, prompt_logprobs=0, repetition_penalty=1.2
    )
    assert params.to_wire()["prompt_logprobs"] == 0, "0 top tokens is not off"
