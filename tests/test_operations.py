"""What an operator sees of minisgl-sched (docs/operations.md): readiness from the first second, /metrics,
the API key, JSON logs that name each request, and the drain after SIGTERM.

Each test starts the scheduler itself (no launcher), so that its flags, environment and log are the test's;
the worker is either a real one over a tiny random model or, for the start-up, a stand-in that only talks
the control protocol.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import free_tcp_port

from minisgl.client import Client, MinisglError, Overloaded
from minisgl.proto import messages

KEY = "sk-test-0123456789"


class Scheduler:
    """A minisgl-sched process with a log the test can read, and (optionally) a real worker."""

    def __init__(
        self,
        model: Path,
        *flags: str,
        env: dict | None = None,
        worker: bool = True,
        worker_flags: tuple[str, ...] = (),
    ):
        self.dir = tempfile.mkdtemp(prefix="minisgl-ops-")
        self.control = f"ipc://{self.dir}/control.sock"
        self.listen = f"ipc://{self.dir}/requests.sock"
        self.port = free_tcp_port()
        self.shm_prefix = f"minisgl-ops-{os.getpid()}-{self.port}"
        sched = os.environ.get("MINISGL_SCHED") or _find_sched()
        cmd = [sched, "--model", str(model), "--control", self.control, "--listen", self.listen]
        cmd += ["--http", f"127.0.0.1:{self.port}", "--shm-prefix", self.shm_prefix, *flags]
        self.log_path = Path(self.dir) / "scheduler.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stderr=self._log, env={**os.environ, **(env or {})})
        self.worker = None
        if worker:
            wcmd = [sys.executable, "-m", "minisgl.worker", "--model", str(model), "--control", self.control]
            wcmd += ["--device", "cpu", "--num-pages", "128", "--max-batch", "4", "--log-level", "warn"]
            wcmd += worker_flags
            self.worker = subprocess.Popen(wcmd)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """(status, headers, decoded body) of one request."""
        conn = self.http()
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            text = raw.decode()
            parsed = (
                json.loads(text)
                if resp.getheader("Content-Type", "").startswith("application/json")
                else text
            )
            return resp.status, resp.headers, parsed
        finally:
            conn.close()

    def wait_http(self, within_s: float = 30) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                self.request("GET", "/health")
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("the HTTP API never answered")

    def wait_serving(self, within_s: float = 120) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not serving within {within_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def segments(self) -> list[str]:
        return glob.glob(f"/dev/shm/{self.shm_prefix}-*")

    def stop(self) -> None:
        for proc in (self.proc, self.worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self._log.close()
        for path in self.segments():
            os.unlink(path)


def _find_sched() -> str:
    root = Path(__file__).resolve().parents[1]
    for build in ("debug", "release"):
        path = root / "target" / build / "minisgl-sched"
        if path.exists():
            return str(path)
    pytest.skip("minisgl-sched is not built")


def sse(resp: http.client.HTTPResponse):
    """The `data:` payloads of a stream, decoded, up to "[DONE]"."""
    for line in resp:
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            yield json.loads(data)


def open_stream(s: Scheduler, body: dict, headers: dict | None = None):
    conn = s.http()
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), headers or {})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


LONG = {"prompt": "Count: 1, 2, 3,", "max_tokens": 600, "ignore_eos": True, "temperature": 0}


# --- start-up --------------------------------------------------------------------------------------------


def test_the_api_answers_from_the_start_with_what_it_waits_for(tiny_model):
    s = Scheduler(tiny_model, env={"MINISGL_API_KEY": KEY}, worker=False)
    try:
        s.wait_http()
        status, _, body = s.request("GET", "/health")
        assert (status, body["status"], body["reason"]) == (503, "starting", "waiting for the worker")
        started = time.monotonic()
        auth = {"Authorization": f"Bearer {KEY}"}
        status, headers, body = s.request("POST", "/v1/completions", {"prompt": "hi"}, auth)
        assert (status, body["error"]["code"]) == (503, "engine_starting")
        assert time.monotonic() - started < 2, "refused at once, not left waiting"
        assert headers["X-Request-Id"].startswith("cmpl-")

        # A stand-in worker says what it is doing; the API reports it.
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(s.control)
        sock.send(msgpack.packb(messages.status("capturing CUDA graphs")))
        assert msgpack.unpackb(sock.recv()) == {"type": "ok"}
        status, _, body = s.request("GET", "/health")
        assert (status, body["reason"]) == (503, "the worker is capturing CUDA graphs")
        sock.close()
    finally:
        s.stop()


def test_a_signal_during_the_start_exits_at_once(tiny_model):
    s = Scheduler(tiny_model, worker=False)
    try:
        s.wait_http()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
    finally:
        s.stop()


# --- a serving scheduler: key, metrics, logs ------------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tiny_model):
    s = Scheduler(tiny_model, "--log-format", "json", env={"MINISGL_API_KEY": KEY})
    try:
        s.wait_serving()
        yield s
    finally:
        s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_v1_routes_need_the_key(serving, headers):
    for method, path, body in (("POST", "/v1/completions", {"prompt": "hi"}), ("GET", "/v1/models", None)):
        status, _, reply = serving.request(method, path, body, headers)
        assert (status, reply["error"]["code"]) == (401, "invalid_api_key"), reply
        assert reply["error"]["type"] == "invalid_request_error"


def test_with_the_key_requests_run_and_probes_need_none(serving):
    status, _, body = serving.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3}, AUTH)
    assert (status, body["usage"]["completion_tokens"]) == (200, 3)
    assert serving.request("GET", "/health")[0] == 200
    status, headers, text = serving.request("GET", "/metrics")
    assert status == 200 and "minisgl_requests_total" in text
    assert headers["Content-Type"].startswith("application/openmetrics-text")


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in\n{text}")


def test_metrics_move_as_requests_run(serving):
    before = serving.request("GET", "/metrics")[2]
    conn, resp = open_stream(serving, {**LONG, "max_tokens": 200}, AUTH)
    next(sse(resp))
    during = serving.request("GET", "/metrics")[2]
    assert metric(during, "minisgl_requests_running") == 1
    assert metric(during, "minisgl_kv_pages_used") > 0
    for _ in sse(resp):
        pass
    conn.close()
    time.sleep(0.2)
    after = serving.request("GET", "/metrics")[2]

    def grew(series: str) -> float:
        return metric(after, series) - metric(before, series)

    assert grew('minisgl_requests_total{outcome="length"}') == 1
    assert grew("minisgl_generation_tokens_total") == 200
    assert grew("minisgl_time_to_first_token_seconds_count") == 1
    assert grew("minisgl_inter_token_latency_seconds_count") == 199
    assert grew("minisgl_e2e_request_latency_seconds_count") == 1
    assert grew('minisgl_step_duration_seconds_count{kind="decode"}') >= 199
    assert grew("minisgl_prompt_tokens_total") > 0
    assert metric(after, "minisgl_requests_running") == 0
    assert metric(after, "minisgl_kv_pages_used") == 0
    assert metric(after, "minisgl_kv_pages_free") == 128


def test_prefix_cache_metrics_count_what_a_repeated_prompt_reuses(serving):
    before = serving.request("GET", "/metrics")[2]
    # Over two pages of prompt, sent twice: the second finds the first's full pages in the cache.
    body = {"prompt": "Count with me: " + ", ".join(str(i) for i in range(30)), "max_tokens": 2}
    replies = [serving.request("POST", "/v1/completions", body, AUTH)[2] for _ in range(2)]
    after = serving.request("GET", "/metrics")[2]
    prompt = replies[0]["usage"]["prompt_tokens"]
    cached = replies[1]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert prompt > 32 and 16 <= cached < prompt and cached % 16 == 0, replies

    def grew(series: str) -> float:
        return metric(after, series) - metric(before, series)

    assert grew("minisgl_prefix_cache_prompt_tokens_total") == 2 * prompt
    assert grew("minisgl_prefix_cache_cached_tokens_total") >= cached
    assert metric(after, "minisgl_prefix_cache_pages") >= cached // 16
    assert (
        0
        <= metric(after, "minisgl_prefix_cache_evictable_pages")
        <= metric(after, "minisgl_prefix_cache_pages")
    )


def test_json_logs_name_the_request_its_response_names(serving):
    conn, resp = open_stream(serving, {**LONG, "max_tokens": 4}, {**AUTH, "X-Request-Id": "trace-42"})
    rid = resp.getheader("X-Request-Id")
    assert rid == "cmpl-trace-42"
    chunks = list(sse(resp))
    assert all(c["id"] == rid for c in chunks)
    conn.close()
    status, headers, _ = serving.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, AUTH)
    assert status == 200 and headers["X-Request-Id"].startswith("cmpl-")
    time.sleep(0.2)
    lines = [json.loads(line) for line in serving.log().splitlines() if line.strip()]
    assert all({"timestamp", "level", "message"} <= line.keys() for line in lines)
    finished = [line for line in lines if line["message"] == "request finished"]
    ours = [line for line in finished if line.get("request_id") == rid]
    assert len(ours) == 1, finished
    assert (ours[0]["completion_tokens"], ours[0]["finish_reason"], ours[0]["level"]) == (4, "length", "INFO")
    assert ours[0]["ttft_ms"] > 0 and ours[0]["total_ms"] >= ours[0]["ttft_ms"]


# --- the drain ---------------------------------------------------------------------------------------------


def test_a_drain_lets_live_requests_finish_and_refuses_new_ones(tiny_model):
    s = Scheduler(tiny_model, "--shutdown-timeout", "60")
    try:
        s.wait_serving()
        conn, resp = open_stream(s, LONG)
        stream = sse(resp)
        next(stream)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, _, body = s.request("POST", "/v1/completions", {"prompt": "hi"})
        assert (status, body["error"]["code"]) == (503, "shutting_down")
        status, _, body = s.request("GET", "/health")
        assert (status, body["status"], body["live_requests"]) == (503, "draining", 1)
        with Client(s.listen, timeout_s=30) as client, pytest.raises(MinisglError) as refused:
            client.generate(text="hi", sampling={"max_tokens": 2})
        assert refused.value.code == "shutting_down"
        chunks = list(stream)
        conn.close()
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", "the live stream ran to its end"
        assert s.proc.wait(30) == 0
        assert s.worker.wait(30) == 0, "the scheduler told the worker to exit"
        assert s.segments() == []
        assert not os.path.exists(s.listen[len("ipc://") :])
    finally:
        s.stop()


def test_a_drain_that_runs_out_of_time_ends_live_requests_with_an_error(tiny_model):
    s = Scheduler(tiny_model, "--shutdown-timeout", "0.5")
    try:
        s.wait_serving()
        conn, resp = open_stream(s, {**LONG, "max_tokens": 1000})
        with Client(s.listen, timeout_s=30) as client:
            rid = client.submit(text="Count: 1, 2,", sampling={"max_tokens": 1000, "ignore_eos": True})
            client.next_reply(rid)  # its first delta: it is running
            started = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            replies = list(client.replies(rid))
        assert (replies[-1]["finish_reason"], "drain timeout" in replies[-1]["message"]) == ("error", True)
        assert time.monotonic() - started < 10
        tail = [line.decode() for line in resp]
        assert any('"error"' in line for line in tail), "the HTTP stream says why it ended"
        conn.close()
        assert s.proc.wait(30) == 0
        assert s.segments() == []
    finally:
        s.stop()


def test_a_second_signal_stops_at_once_and_still_answers_live_requests(tiny_model):
    s = Scheduler(tiny_model, "--shutdown-timeout", "600")
    try:
        s.wait_serving()
        with Client(s.listen, timeout_s=30) as client:
            rid = client.submit(text="Count: 1, 2,", sampling={"max_tokens": 1000, "ignore_eos": True})
            client.next_reply(rid)
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            s.proc.send_signal(signal.SIGINT)
            replies = list(client.replies(rid))
        assert replies[-1]["finish_reason"] == "error"
        assert s.proc.wait(30) == 0
        assert s.segments() == []
    finally:
        s.stop()


# --- a bounded waiting queue --------------------------------------------------------------------------------

MAX_WAITING = 2
# Long enough that the accepted requests still run while the rest of the burst arrives.
BURST = {"prompt": "Count: 1, 2, 3,", "max_tokens": 64, "ignore_eos": True, "temperature": 0}


def test_past_max_waiting_a_burst_is_refused_at_once_and_the_accepted_all_complete(tiny_model):
    # The worker runs 4 requests at once (Scheduler's --max-batch 4) and 2 more may wait: of 16 sent together,
    # at least 10 are refused.
    s = Scheduler(tiny_model, "--max-waiting", str(MAX_WAITING))
    try:
        s.wait_serving()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: s.request("POST", "/v1/completions", BURST), range(16)))
        refused = [(headers, body) for status, headers, body in results if status == 503]
        done = [body for status, _, body in results if status == 200]
        assert len(refused) + len(done) == 16, [r[0] for r in results]
        assert len(refused) >= 10 and done, f"{len(refused)} refused"
        for headers, body in refused:
            assert headers["Retry-After"] == "1"
            error = body["error"]
            assert (error["type"], error["code"]) == ("overloaded_error", "overloaded"), body
            assert f"at most {MAX_WAITING}" in error["message"] and "--max-waiting" in error["message"]
        texts = {body["choices"][0]["text"] for body in done}
        assert len(texts) == 1, "every accepted request ran to its end, greedy, as any other"
        assert all(body["usage"]["completion_tokens"] == 64 for body in done)
        text = s.request("GET", "/metrics")[2]
        assert metric(text, 'minisgl_requests_total{outcome="overloaded"}') == len(refused)
        assert metric(text, 'minisgl_requests_total{outcome="length"}') == len(done)

        # The same over ZeroMQ: the client raises Overloaded for each refusal; the daemon keeps serving.
        with Client(s.listen, timeout_s=120) as c:
            rids = [
                c.submit(text=BURST["prompt"], sampling={"max_tokens": 64, "ignore_eos": True})
                for _ in range(10)
            ]
            outcomes = []
            for rid in rids:
                try:
                    outcomes.append(list(c.replies(rid))[-1]["finish_reason"])
                except Overloaded as e:
                    assert (e.code, e.rid) == ("overloaded", rid) and "--max-waiting" in e.message
                    outcomes.append("overloaded")
            assert outcomes.count("overloaded") >= 4 and "length" in outcomes, outcomes
            assert c.info()["live_requests"] == 0
            final = c.generate(text="hi", sampling={"max_tokens": 2, "ignore_eos": True})
            assert final["finish_reason"] == "length"
        assert s.request("POST", "/v1/completions", {**BURST, "max_tokens": 2})[0] == 200
    finally:
        s.stop()
