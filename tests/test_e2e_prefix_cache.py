"""Acceptance (issue 9), on the CPU with the real default model in fp32: memory pressure, the prefix cache and
mixed steps change when work is done, never what a request generates."""

from __future__ import annotations

import json

import pytest
from conftest import cpu_engine_config

PAGE_SIZE = 16
TOPICS = ["a binary search", "the TCP handshake", "photosynthesis", "prime numbers", "black holes"]


def distinct_requests(n: int) -> list[tuple[dict, dict]]:
    """`n` different requests: chats that share the template's system prompt, and texts that share a preamble
    by topic, so the cache has prefixes to find; half greedy, half seeded sampling."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        if i % 2:
            prompt = {"messages": [{"role": "user", "content": f"In {i + 3} words, describe {topic}."}]}
        else:
            prompt = {"text": f"Notes on {topic}, part {i}:"}
        sampling = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
        if i % 4 >= 2:
            sampling |= {"temperature": 0.8, "top_k": 40, "seed": 100 + i}
        out.append((prompt, sampling))
    return out


@pytest.fixture(scope="module")
def small_pool_engine(model_dir):
    """The default model with a KV pool far smaller than its load."""
    from minisgl.launch import Engine

    config = cpu_engine_config(
        model_dir, num_pages=100, page_size=PAGE_SIZE, max_batch=64, max_step_tokens=512, max_seq_len=1024
    )
    with Engine(config) as running:
        yield running


def test_200_requests_needing_5_times_the_pool_all_complete_as_alone(client, small_pool_engine):
    from minisgl.client import Client

    distinct = distinct_requests(25)
    alone = [client.generate(**prompt, sampling=sampling) for prompt, sampling in distinct]
    requests = [distinct[i % len(distinct)] for i in range(200)]
    need = sum(
        -(-(alone[i % len(distinct)]["prompt_tokens"] + 12) // PAGE_SIZE) for i in range(len(requests))
    )
    assert need >= 5 * small_pool_engine.config.num_pages, f"only {need} pages of KV needed in all"

    with Client(small_pool_engine.config.listen, timeout_s=600) as c:
        rids = [c.submit(**prompt, sampling=sampling, stream=False) for prompt, sampling in requests]
        finals = [list(c.replies(rid))[-1] for rid in rids]
        info = c.info()
    for i, final in enumerate(finals):
        want = alone[i % len(distinct)]
        assert final["finish_reason"] == "length", f"request {i}: {final}"
        assert final["token_ids"] == want["token_ids"], f"request {i} differs from its run alone"
    assert info["live_requests"] == 0


def step_trace(log: str) -> list[dict]:
    """The scheduler's `step planned` lines (JSON logs at trace level for the engine)."""
    steps = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        fields = record.get("fields", record)
        if fields.get("message") == "step planned":
            steps.append({**fields, "requests": [int(r) for r in str(fields["requests"]).split()]})
    return steps


def test_a_running_request_gets_a_token_in_every_step_of_a_chunked_prefill(model_dir):
    from test_operations import Scheduler, open_stream, sse

    trace = ("--log-format", "json", "--log-level", "info,scheduler::engine=trace")
    s = Scheduler(model_dir, "--max-step-tokens", "64", *trace)
    try:
        s.wait_serving(300)
        conn, resp = open_stream(s, {"prompt": "Count to fifty:", "max_tokens": 120, "ignore_eos": True})
        chunks = sse(resp)
        next(chunks)  # the running request has its first token
        long_prompt = "Notes on prime numbers, " + "and more notes " * 120
        status, _, body = s.request("POST", "/v1/completions", {"prompt": long_prompt, "max_tokens": 2})
        assert status == 200, body
        rest = list(chunks)
        conn.close()
        assert rest, "the running request went on"
        steps = step_trace(s.log())
    finally:
        s.stop()
    running = steps[0]["requests"][0]
    chunked = [st for st in steps if any(r != running for r in st["requests"])]
    assert len(chunked) >= body["usage"]["prompt_tokens"] // 64, "the long prompt was prefilled in chunks"
    for st in chunked:
        assert running in st["requests"], f"step {st['step']} left the running request out: {st}"
        assert st["tokens"] <= 64
        assert st["requests"][0] == running, "decodes come first in a mixed step"
