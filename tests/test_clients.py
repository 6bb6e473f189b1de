"""The Python clients: the offline LLM class (on a running engine, or starting its own), `minisgl ask`."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import free_tcp_port

from minisgl.client import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def test_llm_generates_for_every_prompt_form_in_order(engine, client):
    prompts = [
        "def add(a, b):",
        [{"role": "user", "content": "Name a prime number."}],
        [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198],  # the chat prompt "Hello", as ids
    ]
    with LLM(address=engine.config.listen) as llm:
        outputs = llm.generate(prompts, GREEDY)
        single = llm.generate(prompts[0], GREEDY)
    assert len(outputs) == 3
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.finish_reason in ("stop", "length") and 0 < len(out.token_ids) <= 8
        form = {"text": prompt} if isinstance(prompt, str) else None
        if form:
            assert client.generate(**form, sampling={"temperature": 0.0, "max_tokens": 8})["text"] == out.text
    assert single[0].token_ids == outputs[0].token_ids
    assert outputs[2].prompt_tokens == 9


def test_llm_starts_and_stops_its_own_engine(tiny_model):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    with LLM(
        str(tiny_model), listen=address, device="cpu", num_pages=64, max_batch=4, log_level="warn"
    ) as llm:
        [out] = llm.generate(["hello"], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        engine = llm.engine
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert all(p.poll() is not None for p in engine.procs.values()), "closing the LLM stops both processes"


def test_an_offline_llm_leaves_the_default_ports_to_a_server(tiny_model):
    # Hold the default ZeroMQ and HTTP ports, as `minisgl serve` would; one already held is held all the same.
    held = []
    for port in (5557, 8000):
        sock = socket.socket()
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
        held.append(sock)
    try:
        with LLM(str(tiny_model), device="cpu", num_pages=64, max_batch=4, log_level="warn") as llm:
            [out] = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
            engine = llm.engine
            assert engine.config.listen == f"ipc://{engine.run_dir}/requests.sock"
            assert engine.config.http == "off"
    finally:
        for sock in held:
            sock.close()
    assert len(out.token_ids) == 2
    assert not os.path.exists(engine.run_dir), "the socket goes with the run directory"


def test_ask_streams_an_answer(engine):
    cmd = [sys.executable, "-m", "minisgl", "ask", "--address", engine.config.listen, "--max-tokens", "6"]
    cmd += ["--raw", "The capital of France is"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the answer is printed"
    assert "completion tokens" in done.stderr


# --- issue 9 over ZeroMQ: n samples, cached prompt tokens ---------------------------------------------------

SAMPLED = {"temperature": 0.9, "top_k": 50, "seed": 99, "max_tokens": 8, "ignore_eos": True}


def test_n_samples_over_zmq_come_back_by_index(client):
    finals = client.samples(3, text="def add(a, b):", sampling=SAMPLED)
    assert [f["index"] for f in finals] == [0, 1, 2]
    assert all(f["finish_reason"] == "length" and len(f["token_ids"]) == 8 for f in finals)
    assert len({f["prompt_tokens"] for f in finals}) == 1
    assert len({tuple(f["token_ids"]) for f in finals}) > 1, "each sample its own seed"
    alone = client.generate(text="def add(a, b):", sampling=SAMPLED)
    assert alone["index"] == 0 and alone["token_ids"] == finals[0]["token_ids"]

    # Streamed, each sample's deltas make its final's text; the replies end after the third final.
    rid = client.submit(text="def add(a, b):", sampling=SAMPLED, n=3)
    pieces, texts = {0: "", 1: "", 2: ""}, {}
    for msg in client.replies(rid):
        if msg["type"] == "delta":
            pieces[msg["index"]] += msg["text"]
        else:
            texts[msg["index"]] = msg["text"]
    assert texts == pieces == {f["index"]: f["text"] for f in finals}
    with pytest.raises(ValueError, match="samples"):
        client.generate(text="x", n=2)


def test_an_abort_ends_every_sample_of_a_zmq_request(client):
    endless = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0.0}
    rid = client.submit(text="Count to a million: 1, 2, 3,", sampling=endless, n=2)
    replies = client.replies(rid)
    assert next(replies)["type"] == "delta"
    client.abort(rid)
    finals = [m for m in replies if m["type"] == "final"]
    assert sorted(f["index"] for f in finals) == [0, 1]
    assert all(f["finish_reason"] == "abort" for f in finals)
    deadline = time.monotonic() + 10
    while client.info(timeout_s=30)["live_requests"]:
        assert time.monotonic() < deadline, "the aborted samples are still live"
        time.sleep(0.05)


def test_the_final_says_how_much_of_the_prompt_the_cache_served(client):
    text = f"{time.time_ns()}: " + "A list of prime numbers, one per line, in order. " * 5
    sampling = {"temperature": 0.0, "max_tokens": 4}
    first = client.generate(text=text, sampling=sampling)
    second = client.generate(text=text, sampling=sampling)
    assert first["cached_tokens"] == 0
    assert 16 <= second["cached_tokens"] < second["prompt_tokens"] and second["cached_tokens"] % 16 == 0
    assert second["token_ids"] == first["token_ids"]
