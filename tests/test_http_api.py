"""The OpenAI-compatible HTTP API of minisgl-sched, against the session engine (docs/http.md).

Plain http.client from the standard library, to see the bytes on the wire; test_openai_api.py drives the same
API through the official `openai` package."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from conftest import E2E_MAX_BATCH, E2E_MAX_SEQ_LEN

GREEDY = {"temperature": 0.0, "max_tokens": 12}
CHAT = [{"role": "user", "content": "Write a haiku about the sea."}]


def connect(engine, timeout: float = 300) -> http.client.HTTPConnection:
    host, port = engine.config.http.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def request(engine, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    conn = connect(engine)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def post(engine, path: str, body: dict | bytes) -> tuple[int, dict]:
    return request(engine, "POST", path, body)


def open_stream(engine, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = connect(engine)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    return conn, resp


def events(resp: http.client.HTTPResponse):
    """The `data:` payloads of an SSE response, decoded, up to and including "[DONE]"."""
    for line in resp:
        line = line.decode().rstrip("\r\n")
        if not line.startswith("data: "):
            continue  # blank separators, keep-alive comments
        data = line[len("data: ") :]
        yield data if data == "[DONE]" else json.loads(data)
        if data == "[DONE]":
            return


def stream(engine, path: str, body: dict) -> list:
    conn, resp = open_stream(engine, path, body)
    try:
        return list(events(resp))
    finally:
        conn.close()


def assert_error(status: int, body: dict, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    error = body["error"]
    assert error["code"] == code and error["message"], body
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")


def assert_still_serving(engine) -> None:
    status, body = post(engine, "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body


def test_a_completion_equals_the_zmq_clients_greedy_output(engine, client):
    prompt = "def quicksort(xs):"
    status, body = post(engine, "/v1/completions", {"model": "ignored", "prompt": prompt, **GREEDY})
    assert status == 200, body
    final = client.generate(text=prompt, sampling=GREEDY)
    [choice] = body["choices"]
    assert choice["text"] == final["text"] and choice["text"]
    assert choice["finish_reason"] == final["finish_reason"] == "length"
    usage = dict(body["usage"])
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]
    assert usage == {
        "prompt_tokens": final["prompt_tokens"],
        "completion_tokens": len(final["token_ids"]),
        "total_tokens": final["prompt_tokens"] + len(final["token_ids"]),
    }
    assert 0 <= cached < final["prompt_tokens"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "Qwen2.5-Coder-0.5B-Instruct"


def test_a_prompt_of_token_ids_and_a_stop_string(engine, client):
    prompt_ids = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]  # the chat prompt "Hello"
    status, body = post(engine, "/v1/completions", {"prompt": prompt_ids, **GREEDY})
    final = client.generate(input_ids=prompt_ids, sampling=GREEDY)
    assert status == 200 and body["choices"][0]["text"] == final["text"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    # Greedy output is known from the ZeroMQ side: stop at its second word.
    full = client.generate(text="The capital of France is", sampling=GREEDY)["text"]
    stop = full.split()[1]
    body = {"prompt": "The capital of France is", "stop": [stop], **GREEDY}
    status, out = post(engine, "/v1/completions", body)
    assert status == 200 and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == full[: full.index(stop)]


def test_chat_streamed_deltas_concatenate_to_the_non_streamed_content(engine, client):
    body = {"messages": CHAT, "max_completion_tokens": 16, "temperature": 0}
    status, whole = post(engine, "/v1/chat/completions", body)
    assert status == 200, whole
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    final = client.generate(messages=CHAT, sampling={"temperature": 0.0, "max_tokens": 16})
    assert message["content"] == final["text"]
    assert whole["usage"]["prompt_tokens"] == final["prompt_tokens"]
    assert whole["usage"]["completion_tokens"] == len(final["token_ids"])
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")

    chunks = stream(engine, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == message["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and not any(reasons[:-1])
    assert chunks[-1]["choices"] == [] and counts(chunks[-1]["usage"]) == counts(whole["usage"])
    # The same messages again: the cache now holds their prompt's full pages.
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def counts(usage: dict) -> dict:
    """A usage without what the prefix cache's state decides."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def test_a_completion_stream(engine, client):
    chunks = stream(engine, "/v1/completions", {"prompt": "def quicksort(xs):", **GREEDY})
    assert chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == client.generate(text="def quicksort(xs):", sampling=GREEDY)["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1]), "usage only when stream_options asks for it"


def test_models_and_health(engine):
    status, body = request(engine, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "Qwen2.5-Coder-0.5B-Instruct" and model["object"] == "model"
    assert model["max_model_len"] == E2E_MAX_SEQ_LEN
    status, body = request(engine, "GET", "/health")
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize(
    "path,body,status,code",
    [
        ("/v1/completions", b'{"prompt": "x", ', 400, "invalid_json"),
        ("/v1/chat/completions", b"not json at all", 400, "invalid_json"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "invalid_params"),
        ("/v1/completions", {"prompt": "x", "n": 0}, 400, "invalid_params"),
        ("/v1/chat/completions", {"messages": CHAT, "n": E2E_MAX_BATCH + 1}, 400, "invalid_params"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "invalid_params"),
        ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "unknown_parameter"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "invalid_params"),
        ("/v1/completions", {"prompt": [9707] * (E2E_MAX_SEQ_LEN + 1)}, 400, "context_length_exceeded"),
        ("/v1/completions", {"prompt": [1 << 30]}, 400, "invalid_params"),
        ("/v1/completions", {"prompt": ""}, 400, "empty_prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "invalid_params"),
        ("/v1/embeddings", {"input": "x"}, 404, "not_found"),
    ],
    ids=[
        "bad-json",
        "not-json",
        "bad-temperature",
        "n-0",
        "chat-n-over-the-batch",
        "max-tokens-0-without-echo",
        "unknown-field",
        "no-content",
        "over-long-prompt",
        "token-outside-vocab",
        "empty-prompt",
        "no-messages",
        "unknown-route",
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(engine, path, body, status, code):
    got_status, got = post(engine, path, body)
    assert_error(got_status, got, status, code)
    assert_still_serving(engine)


def test_an_over_long_text_prompt_says_how_long_it_was(engine):
    status, body = post(engine, "/v1/completions", {"prompt": "hello " * E2E_MAX_SEQ_LEN})
    assert_error(status, body, 400, "context_length_exceeded")
    assert f"context length {E2E_MAX_SEQ_LEN}" in body["error"]["message"]


BODY_LIMIT = 2 << 20  # axum's default, which the API keeps


def test_a_body_over_the_limit_is_413(engine):
    # Only just over: the server answers once it has read the limit, and the rest must fit the socket buffers.
    status, body = post(engine, "/v1/completions", b'{"prompt": "' + b"x" * BODY_LIMIT + b'"}')
    assert_error(status, body, 413, "request_too_large")
    assert_still_serving(engine)


def wait_until_idle(client, within_s: float = 10.0) -> float:
    """Seconds until the scheduler reports no live request (fails after `within_s`)."""
    start = time.monotonic()
    while (live := client.info(timeout_s=30)["live_requests"]) != 0:
        assert time.monotonic() - start < within_s, f"{live} requests still live"
        time.sleep(0.05)
    return time.monotonic() - start


# Long enough that it cannot finish on its own during the test: only an abort ends it.
ENDLESS = {"prompt": "Count to a million: 1, 2, 3,", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def test_a_streaming_client_that_disconnects_leaves_no_live_request(engine, client):
    conn, resp = open_stream(engine, "/v1/completions", ENDLESS)
    received = events(resp)
    for _ in range(3):
        assert next(received)["choices"][0]["finish_reason"] is None
    assert client.info(timeout_s=30)["live_requests"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until_idle(client)
    assert_still_serving(engine)


def test_a_waiting_client_that_disconnects_leaves_no_live_request(engine, client):
    conn = connect(engine)
    conn.request("POST", "/v1/completions", json.dumps(ENDLESS), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while client.info(timeout_s=30)["live_requests"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until_idle(client)
    assert_still_serving(engine)


# --- issue 9: n samples, cached prompt tokens --------------------------------------------------------------

SAMPLED = {"temperature": 0.9, "top_k": 50, "max_tokens": 12, "seed": 1234, "ignore_eos": True}


def test_n_choices_differ_are_reproducible_and_count_the_prompt_once(engine, client):
    body = {"messages": CHAT, "n": 3, **SAMPLED}
    status, whole = post(engine, "/v1/chat/completions", body)
    assert status == 200, whole
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in whole["choices"])
    texts = [c["message"]["content"] for c in whole["choices"]]
    assert len(set(texts)) > 1, f"derived seeds make the samples differ: {texts}"
    status, single = post(engine, "/v1/chat/completions", {"messages": CHAT, **SAMPLED})
    assert single["choices"][0]["message"]["content"] == texts[0], "sample 0 keeps the request's seed"
    usage = whole["usage"]
    assert usage["prompt_tokens"] == single["usage"]["prompt_tokens"], "the prompt counts once"
    assert usage["completion_tokens"] == 3 * SAMPLED["max_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    status, again = post(engine, "/v1/chat/completions", body)
    assert [c["message"]["content"] for c in again["choices"]] == texts, "the same seed, the same choices"
    # The ZeroMQ door derives the same seeds.
    finals = client.samples(3, messages=CHAT, sampling=SAMPLED)
    assert [f["index"] for f in finals] == [0, 1, 2]
    assert [f["text"] for f in finals] == texts


def test_n_choices_stream_each_with_its_index_and_end_together(engine):
    body = {"prompt": "def fib(n):", "n": 2, **SAMPLED}
    chunks = stream(engine, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * SAMPLED["max_tokens"]
    texts, reasons = {0: "", 1: ""}, {}
    for chunk in chunks[:-2]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            reasons[choice["index"]] = choice["finish_reason"]
    assert reasons == {0: "length", 1: "length"}
    status, whole = post(engine, "/v1/completions", body)
    assert status == 200 and [c["text"] for c in whole["choices"]] == [texts[0], texts[1]]
    assert counts(whole["usage"]) == counts(usage["usage"])


def test_n_beyond_the_batch_is_a_400_naming_n(engine):
    status, body = post(engine, "/v1/completions", {"prompt": "x", "n": E2E_MAX_BATCH + 1})
    assert_error(status, body, 400, "invalid_params")
    assert body["error"]["param"] == "n" and f"at most {E2E_MAX_BATCH}" in body["error"]["message"]


def test_a_repeated_prompt_reports_its_cached_tokens_and_gives_the_same_output(engine):
    # A prompt no earlier test sent (its first tokens are a fresh number), over three pages long.
    prompt = f"{time.time_ns()}: " + "The quick brown fox jumps over the lazy dog. " * 6
    body = {"prompt": prompt, **GREEDY}
    status, first = post(engine, "/v1/completions", body)
    assert status == 200
    status, second = post(engine, "/v1/completions", body)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert prompt_tokens > 48
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 48 <= cached < prompt_tokens and cached % 16 == 0, "whole pages, and at least one token computed"
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    chunks = stream(engine, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_a_client_that_disconnects_from_n_streams_ends_every_sample(engine, client):
    conn, resp = open_stream(engine, "/v1/completions", {**ENDLESS, "n": 3})
    received = events(resp)
    seen = set()
    while len(seen) < 3:
        [choice] = next(received)["choices"]
        assert choice["finish_reason"] is None
        seen.add(choice["index"])
    assert client.info(timeout_s=30)["live_requests"] == 1, "one request, three samples"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until_idle(client)
    assert_still_serving(engine)
