"""Every request learns its fate (issue 11; docs/protocol.md "Liveness", docs/operations.md "Limits"): a
signal to the engine ends every open stream on both doors, a killed scheduler is noticed by a waiting ZeroMQ
client within about 2 s, a client that goes away has its requests aborted, a request the KV cache cannot hold
ends with `memory`, and each limit refuses with a message that names it.

The engines run a tiny random Qwen2 (conftest's `tiny_model`) on the CPU; the scheduler is started directly
(test_operations.Scheduler) where a test needs its flags or its pid, and through the launcher for the signals.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import pytest
import zmq
from conftest import free_tcp_port
from test_operations import Scheduler, metric, sse

from minisgl.client import Client, MinisglError, SchedulerGone

# Long enough to be running whenever the test acts: the tiny model on a shared CPU makes ~10-100 tokens/s.
LONG_SAMPLING = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0}
LONG_HTTP = {"prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def wait_until(predicate, within_s: float, what: str, every_s: float = 0.05):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {within_s} s: {what}")


def live_requests(s: Scheduler) -> int:
    return s.request("GET", "/health")[2]["live_requests"]


def metrics(s: Scheduler) -> str:
    return s.request("GET", "/metrics")[2]


# --- signals: every open stream gets its ending ---------------------------------------------------------


class Launched:
    """`python -m minisgl.launch` in a process of its own, for the test to signal as a terminal would."""

    def __init__(self, model, *flags: str):
        self.dir = tempfile.mkdtemp(prefix="minisgl-fates-")
        self.listen = f"ipc://{self.dir}/requests.sock"
        self.port = free_tcp_port()
        cmd = [sys.executable, "-m", "minisgl.launch", "--model", str(model), "--device", "cpu"]
        cmd += ["--listen", self.listen, "--http", f"127.0.0.1:{self.port}", "--num-pages", "256"]
        cmd += ["--max-batch", "8", "--log-level", "warn", *flags]
        self.log = open(os.path.join(self.dir, "launch.log"), "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_serving(self, within_s: float = 180) -> None:
        def serving() -> bool:
            assert self.proc.poll() is None, self.text()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_until(serving, within_s, "the launched engine serves", every_s=0.2)

    def stream(self, body: dict):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return conn, resp

    def text(self) -> str:
        with open(os.path.join(self.dir, "launch.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_engine_ends_every_open_stream_on_both_doors(tiny_model, sig):
    engine = Launched(tiny_model, "--shutdown-timeout", "1")
    try:
        engine.wait_serving()
        # Two ZeroMQ clients, with and without keepalive, and two HTTP streams, all mid-stream.
        zmq_clients = [Client(engine.listen, timeout_s=30, keepalive=k) for k in (True, False)]
        rids = [c.submit(text="Count: 1, 2,", sampling=LONG_SAMPLING) for c in zmq_clients]
        for c, rid in zip(zmq_clients, rids, strict=True):
            assert c.next_reply(rid)["type"] == "delta"
        streams = [engine.stream(LONG_HTTP) for _ in range(2)]
        for _, resp in streams:
            assert isinstance(next(sse(resp)), dict), "a first chunk: streaming"

        signalled = time.monotonic()
        engine.proc.send_signal(sig)
        for c, rid in zip(zmq_clients, rids, strict=True):
            replies = list(c.replies(rid))
            final = replies[-1]
            assert (final["type"], final["finish_reason"]) == ("final", "error"), final
            assert "drain timeout" in final["message"], final
            assert sum(r["type"] == "final" for r in replies) == 1, "exactly one ending"
            c.close()
        for conn, resp in streams:
            tail = resp.read().decode()
            conn.close()
            events = [line[len("data: ") :] for line in tail.splitlines() if line.startswith("data: ")]
            assert any('"error"' in e for e in events), f"the HTTP stream says why it ended: {events[-3:]}"
        ended = time.monotonic() - signalled
        assert ended < 15, f"the streams took {ended:.1f} s to end"
        assert engine.proc.wait(30) == 0, engine.text()
    finally:
        engine.stop()


# --- a killed scheduler ------------------------------------------------------------------------------------


def test_a_killed_scheduler_is_noticed_by_a_waiting_zeromq_client_within_about_2_s(tiny_model):
    s = Scheduler(tiny_model)
    try:
        s.wait_serving()
        with Client(s.listen, timeout_s=60) as client:
            rid = client.submit(text="Count: 1, 2,", sampling=LONG_SAMPLING)
            assert client.next_reply(rid)["type"] == "delta"
            s.proc.kill()
            killed = time.monotonic()
            with pytest.raises(SchedulerGone) as gone:
                for _ in client.replies(rid):
                    pass
            noticed = time.monotonic() - killed
        assert 1.5 < noticed < 3.5, f"SchedulerGone after {noticed:.2f} s"
        assert gone.value.code == "scheduler_gone" and gone.value.rids == [rid]
        assert "gone" in str(gone.value)
    finally:
        s.stop()


# --- clients that go away ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy(tiny_model):
    s = Scheduler(tiny_model, "--max-client-requests", "3")
    s.wait_serving()
    yield s
    s.stop()


def aborted_total(s: Scheduler) -> float:
    return metric(metrics(s), 'minisgl_requests_total{outcome="abort"}')


def test_a_client_that_closes_its_socket_mid_request_is_aborted_at_once(roomy):
    before = aborted_total(roomy)
    gone = Client(roomy.listen, timeout_s=60, keepalive=False)
    rid = gone.submit(text="Count: 1, 2,", sampling=LONG_SAMPLING)
    assert gone.next_reply(rid)["type"] == "delta"
    assert live_requests(roomy) == 1
    gone.close()
    closed = time.monotonic()
    wait_until(lambda: live_requests(roomy) == 0, 2.0, "the request of a closed socket is aborted")
    took = time.monotonic() - closed
    assert aborted_total(roomy) == before + 1
    assert took < 2.0, took


def test_a_silent_keepalive_client_is_aborted_after_2_s_and_a_talking_one_is_not(roomy):
    # A client that asked for keepalive and then froze: its socket stays open, it sends nothing more.
    ctx = zmq.Context.instance()
    frozen = ctx.socket(zmq.DEALER)
    frozen.setsockopt(zmq.LINGER, 0)
    frozen.connect(roomy.listen)
    request = {"type": "generate", "rid": "frozen", "text": "Count: 1, 2,", "sampling": LONG_SAMPLING}
    started = time.monotonic()
    frozen.send(msgpack.packb({**request, "keepalive": True}))
    # A slow consumer with keepalive on: it reads nothing for 3 s, its background thread keeps it alive.
    with Client(roomy.listen, timeout_s=60) as slow:
        rid = slow.submit(text="Count: 1, 2,", sampling=LONG_SAMPLING)
        assert slow.next_reply(rid)["type"] == "delta"
        read = time.monotonic()
        wait_until(lambda: live_requests(roomy) == 1, 4.0, "the frozen client's request is aborted")
        took = time.monotonic() - started
        assert 1.9 < took < 3.5, f"aborted {took:.2f} s after its last word"
        time.sleep(max(0.0, read + 3.0 - time.monotonic()))
        assert live_requests(roomy) == 1, "the slow reader's request runs on"
        # It got heartbeats all along: a frozen client's socket holds them.
        kinds = []
        while frozen.poll(0):
            kinds.append(msgpack.unpackb(frozen.recv())["type"])
        assert "heartbeat" in kinds and kinds[-1] == "final", kinds[-5:]
        # Closing the generator early aborts the request.
        replies = slow.replies(rid)
        next(replies)
        replies.close()
        wait_until(lambda: live_requests(roomy) == 0, 2.0, "a closed generator aborts its request")
        # The client stays usable, and the aborted request's replies do not leak into the next one's.
        final = slow.generate(text="hi", sampling={"max_tokens": 2})
        assert final["finish_reason"] == "length" and final["rid"] != rid
    frozen.close()


def test_past_max_client_requests_a_client_is_refused_with_the_rid(roomy):
    with Client(roomy.listen, timeout_s=60) as client:
        rids = [client.submit(text="Count:", sampling=LONG_SAMPLING) for _ in range(3)]
        refused = client.submit(text="Count:", sampling=LONG_SAMPLING, rid="one-too-many")
        with pytest.raises(MinisglError) as e:
            list(client.replies(refused))
        assert e.value.code == "too_many_requests"
        assert '"one-too-many"' in e.value.message and "--max-client-requests" in e.value.message
        assert "at most 3" in e.value.message
        # Another client is not held to this one's count.
        with Client(roomy.listen, timeout_s=60) as other:
            assert other.generate(text="hi", sampling={"max_tokens": 1})["finish_reason"] == "length"
        for rid in rids:
            client.abort(rid)
            assert list(client.replies(rid))[-1]["finish_reason"] == "abort"
    wait_until(lambda: live_requests(roomy) == 0, 5, "the aborted requests ended")


# --- memory, and the limits --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cramped(tiny_model):
    # 8 pages of 4 tokens: 32 tokens of KV in all.
    s = Scheduler(
        tiny_model,
        "--max-connections",
        "3",
        worker_flags=("--num-pages", "8", "--page-size", "4"),
    )
    s.wait_serving()
    yield s
    s.stop()


def test_a_request_the_kv_cache_cannot_hold_ends_with_memory_on_zeromq_and_length_on_http(cramped):
    memory_before = metric(metrics(cramped), 'minisgl_requests_total{outcome="memory"}')
    with Client(cramped.listen, timeout_s=120) as client:
        final = client.generate(text="Count: 1, 2,", sampling={"max_tokens": 400, "ignore_eos": True})
    assert final["finish_reason"] == "memory", final
    assert final["prompt_tokens"] + final["completion_tokens"] <= 33 and final["completion_tokens"] > 0
    status, _, body = cramped.request(
        "POST", "/v1/completions", {"prompt": "Count: 1, 2,", "max_tokens": 400, "ignore_eos": True}
    )
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] < 400
    assert metric(metrics(cramped), 'minisgl_requests_total{outcome="memory"}') == memory_before + 2


def test_a_body_over_2_mib_is_refused_with_the_limit_named(cramped):
    conn = cramped.http()
    body = json.dumps({"prompt": "x" * (2 << 20), "max_tokens": 1})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    error = json.loads(resp.read())["error"]
    conn.close()
    assert (resp.status, error["code"]) == (413, "request_too_large")
    assert "2 MiB" in error["message"], error


def test_stop_strings_are_bounded_on_both_doors(cramped):
    for stop, says in ([["x"] * 17, "at most 16 strings"], [["y" * 257], "at most 256 characters"]):
        status, _, body = cramped.request("POST", "/v1/completions", {"prompt": "hi", "stop": stop})
        assert (status, body["error"]["param"]) == (400, "stop"), body
        assert says in body["error"]["message"], body
        with Client(cramped.listen, timeout_s=30) as client, pytest.raises(MinisglError) as e:
            client.generate(text="hi", sampling={"stop": stop})
        assert e.value.code == "invalid_params" and says in e.value.message
    with Client(cramped.listen, timeout_s=60) as client:
        final = client.generate(text="hi", sampling={"stop": ["z" * 256] * 16, "max_tokens": 2})
    assert final["finish_reason"] in ("length", "stop", "memory")


def test_past_max_connections_a_new_connection_gets_a_503_and_a_freed_place_is_taken(cramped):
    held = [socket.create_connection(("127.0.0.1", cramped.port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # accepted by the server
        status, headers, body = cramped.request("GET", "/health")
        assert (status, body["error"]["code"]) == (503, "too_many_connections"), body
        assert "3 connections" in body["error"]["message"] and "--max-connections" in body["error"]["message"]
        assert headers["Retry-After"] == "1"
        held.pop().close()
        wait_until(lambda: cramped.request("GET", "/health")[0] == 200, 5, "a freed place serves again")
    finally:
        for conn in held:
            conn.close()
    # The server frees a place when it reads the close, a moment later: the next test must not find them held.
    wait_until(lambda: cramped.request("GET", "/health")[0] == 200, 5, "every place is free again")


def test_the_older_limits_say_theirs(cramped):
    # The prompt against the KV cache (32 tokens here) and the context; max_tokens below 1.
    status, _, body = cramped.request("POST", "/v1/completions", {"prompt": "word " * 200})
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded"), body
    assert "at most" in body["error"]["message"], body
    status, _, body = cramped.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0})
    assert (status, body["error"]["param"]) == (400, "max_tokens"), body


# --- the Python client's side of keepalive, against a stand-in scheduler -----------------------------------


@pytest.fixture
def router():
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()


def received(sock) -> list[dict]:
    out = []
    while sock.poll(0):
        out.append(msgpack.unpackb(sock.recv_multipart()[-1]))
    return out


def final_of(rid: str) -> bytes:
    return msgpack.packb({"type": "final", "rid": rid, "index": 0, "finish_reason": "length", "text": ""})


def test_the_client_keeps_alive_while_its_caller_is_busy_and_heartbeats_keep_it_waiting(router):
    sock, address = router
    with Client(address, timeout_s=30) as client:
        rid = client.submit(text="hi")
        identity, payload = sock.recv_multipart()
        assert msgpack.unpackb(payload)["keepalive"] is True
        time.sleep(1.6)  # the caller is busy elsewhere: the client's thread speaks for it
        kinds = [m["type"] for m in received(sock)]
        assert kinds.count("keepalive") >= 2, kinds

        def beat_then_end():
            for _ in range(7):
                sock.send_multipart([identity, msgpack.packb({"type": "heartbeat"})])
                time.sleep(0.5)
            sock.send_multipart([identity, final_of(rid)])

        beater = threading.Thread(target=beat_then_end)
        started = time.monotonic()
        beater.start()
        replies = list(client.replies(rid))
        beater.join()
        assert [r["type"] for r in replies] == ["final"], "heartbeats are not replies"
        assert time.monotonic() - started > 3, "3.5 s of heartbeats, no SchedulerGone"
        kinds = [m["type"] for m in received(sock)]
        assert kinds.count("keepalive") >= 5, "the waiting thread sent them itself"
        # Nothing live: no keepalives, and silence is not an error.
        time.sleep(1.2)
        assert received(sock) == []


def test_the_client_raises_scheduler_gone_after_2_s_of_silence_and_only_with_keepalive(router):
    sock, address = router
    with Client(address, timeout_s=30) as client:
        rid = client.submit(text="hi")
        sock.recv_multipart()
        started = time.monotonic()
        with pytest.raises(SchedulerGone) as gone:
            client.next_reply(rid)
        silent = time.monotonic() - started
        assert 1.9 < silent < 2.6, silent
        assert gone.value.rids == [rid] and "no heartbeat or reply" in gone.value.message
    with Client(address, timeout_s=2.5, keepalive=False) as client:
        rid = client.submit(text="hi")
        assert "keepalive" not in msgpack.unpackb(sock.recv_multipart()[-1])
        with pytest.raises(TimeoutError):
            client.next_reply(rid)
