"""`minisgl chat`, scripted through a pipe: against a stand-in server that records what it is sent (the
history, the key, the commands' effects), and against the real engine's HTTP API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_tcp_port


def chat(url: str, stdin: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "minisgl", "chat", "--url", url, *args]
    env = {k: v for k, v in os.environ.items() if k != "MINISGL_API_KEY"} | (env or {})
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


class StandIn(BaseHTTPRequestHandler):
    """Answers turn N with "answer N", streamed in pieces with chunked encoding and a keep-alive comment, as
    minisgl's server does; a message containing "fail" gets a 400."""

    protocol_version = "HTTP/1.1"
    requests: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        assert self.path == "/v1/models"
        self._send_json(200, {"object": "list", "data": [{"id": "stand-in", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if "fail" in body["messages"][-1]["content"]:
            self._send_json(400, {"error": {"message": "refused on purpose", "code": "invalid_params"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        answer = f"answer {len(self.requests)}"
        events = [": keep-alive\n\n", self._chunk({"role": "assistant", "content": ""})]
        events += [self._chunk({"content": piece}) for piece in re.findall(r"\S+\s*", answer)]
        events += [self._chunk({}, finish="stop"), self._usage(len(answer)), "data: [DONE]\n\n"]
        for event in events:
            data = event.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

    def _usage(self, n: int) -> str:
        usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}
        return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stand_in() -> Iterator[tuple[str, list[dict]]]:
    handler = type("Recorder", (StandIn,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler.requests
    finally:
        server.shutdown()
        server.server_close()


def test_chat_sends_the_whole_conversation_each_turn(stand_in):
    url, requests = stand_in
    done = chat(
        url, "My name is Ada.\nWhat is my name?\n", "--system", "Be brief.", env={"MINISGL_API_KEY": "k3y"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "answer 1\nanswer 2\n"
    assert done.stderr.count("[stop: 10 prompt + 8 completion tokens]") == 2
    assert [r["path"] for r in requests] == ["/v1/chat/completions"] * 2
    assert all(r["auth"] == "Bearer k3y" for r in requests)
    first, second = (r["body"] for r in requests)
    assert first["stream"] is True and first["model"] == "stand-in"
    system = {"role": "system", "content": "Be brief."}
    assert first["messages"] == [system, {"role": "user", "content": "My name is Ada."}]
    assert second["messages"] == [
        system,
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "What is my name?"},
    ]


def test_reset_and_a_failed_turn_leave_no_trace_in_the_history(stand_in):
    url, requests = stand_in
    stdin = "one\n/reset\n\ntwo\nplease fail\n/nonsense\nthree\n/exit\nnever sent\n"
    done = chat(url, stdin, "--temperature", "0", "--max-tokens", "5", "--model", "m")
    assert done.returncode == 1, "a failed turn fails the scripted run"
    assert "refused on purpose" in done.stderr and "unknown command /nonsense" in done.stderr
    assert done.stdout == "answer 1\nanswer 2\nanswer 4\n"
    bodies = [r["body"] for r in requests]
    assert [m["content"] for m in bodies[1]["messages"]] == ["two"]
    assert [m["content"] for m in bodies[3]["messages"]] == ["two", "answer 2", "three"]
    assert all(b["temperature"] == 0 and b["max_tokens"] == 5 and b["model"] == "m" for b in bodies)


def test_an_unreachable_server_is_one_clear_error():
    done = chat(f"http://127.0.0.1:{free_tcp_port()}/v1", "hi\n")
    assert done.returncode == 1 and "cannot use" in done.stderr and done.stdout == ""


def test_chat_against_the_engine_streams_and_keeps_the_history(engine):
    url = f"http://{engine.config.http}/v1"
    done = chat(url, "Say hello.\nNow say it again.\n", "--temperature", "0", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    usage = re.findall(r"\[(\w+): (\d+) prompt \+ (\d+) completion tokens\]", done.stderr)
    assert len(usage) == 2, done.stderr
    (_, prompt1, completion1), (_, prompt2, _) = usage
    # The second prompt holds the first exchange: both messages and the answer's tokens.
    assert int(prompt2) > int(prompt1) + int(completion1)
    assert done.stdout.strip()
