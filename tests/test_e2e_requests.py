"""Stop conditions, abort, and clients that go away: what a user of the request socket relies on."""

from __future__ import annotations

import time

from minisgl.client import Client

COUNT = {"text": "Count from 1 to 100: 1, 2, 3,"}


def test_max_tokens_ends_with_length(client):
    final = client.generate(**COUNT, sampling={"temperature": 0.0, "max_tokens": 5})
    assert final["finish_reason"] == "length"
    assert final["completion_tokens"] == 5 == len(final["token_ids"])


def test_eos_ends_with_stop_and_ignore_eos_goes_on(client):
    msgs = [{"role": "user", "content": "Reply with the single word: yes"}]
    final = client.generate(messages=msgs, sampling={"temperature": 0.0, "max_tokens": 64})
    assert final["finish_reason"] == "stop"
    assert final["token_ids"][-1] in (151645, 151643)
    assert "<|im_end|>" not in final["text"]
    longer = client.generate(
        messages=msgs, sampling={"temperature": 0.0, "max_tokens": 64, "ignore_eos": True}
    )
    assert longer["finish_reason"] == "length" and len(longer["token_ids"]) == 64
    assert longer["token_ids"][: len(final["token_ids"])] == final["token_ids"]


def test_stop_string_cuts_the_text(client):
    full = client.generate(**COUNT, sampling={"temperature": 0.0, "max_tokens": 20})
    text = full["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # greedy: the same text comes again, up to the stop
    final = client.generate(**COUNT, sampling={"temperature": 0.0, "max_tokens": 20, "stop": [stop, "never"]})
    assert final["finish_reason"] == "stop"
    assert final["text"] == text[: text.index(stop)]
    assert len(final["token_ids"]) < len(full["token_ids"])


def test_stop_token_id(client):
    full = client.generate(**COUNT, sampling={"temperature": 0.0, "max_tokens": 12})
    stop_id = full["token_ids"][4]
    final = client.generate(
        **COUNT, sampling={"temperature": 0.0, "max_tokens": 12, "stop_token_ids": [stop_id]}
    )
    first = full["token_ids"].index(stop_id)
    assert final["finish_reason"] == "stop"
    assert final["token_ids"] == full["token_ids"][: first + 1]


def test_abort_mid_stream(client):
    rid = client.submit(**COUNT, sampling={"temperature": 0.0, "max_tokens": 200}, stream=True)
    first = client.next_reply(rid, timeout_s=60)
    assert first["type"] == "delta"
    client.abort(rid)
    replies = [first]
    while replies[-1]["type"] != "final":
        replies.append(client.next_reply(rid, timeout_s=60))
    assert replies[-1]["finish_reason"] == "abort"
    assert len(replies[-1]["token_ids"]) < 200


def test_seeded_sampling_is_reproducible(client):
    sampling = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 16}
    a = client.generate(text="Once upon a time", sampling=sampling)["token_ids"]
    b = client.generate(text="Once upon a time", sampling=sampling)["token_ids"]
    c = client.generate(text="Once upon a time", sampling={**sampling, "seed": 99})["token_ids"]
    assert a == b
    assert a != c


def test_a_client_that_disconnects_mid_request_leaves_the_daemon_serving(engine, client):
    gone = Client(engine.config.listen)
    gone.submit(**COUNT, sampling={"temperature": 0.0, "max_tokens": 40}, stream=True)
    gone.recv_any(timeout_s=60)
    gone.close()
    time.sleep(0.2)
    final = client.generate(**COUNT, sampling={"temperature": 0.0, "max_tokens": 4})
    assert final["finish_reason"] == "length"


def test_info(client):
    info = client.info(timeout_s=30)
    assert info["vocab_size"] == 151936
    assert set(info["eos_token_ids"]) == {151645, 151643}
    assert info["max_seq_len"] > 0 and info["num_pages"] > 0 and info["max_batch"] > 0
