"""A ZeroMQ client of minisgl-sched (docs/protocol.md, section 1).

One DEALER socket carries any number of requests at once; replies are sorted by request id as they arrive, so
several requests can be consumed in any order. A request of `n` samples gets deltas and a final per sample,
each with its sample's `index`; `replies(rid)` ends after the last of the n finals.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgpack
import zmq

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"


class MinisglError(RuntimeError):
    """The scheduler refused a message; `code` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str, rid: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.rid = rid


class Overloaded(MinisglError):
    """The scheduler's waiting queue is full (its --max-waiting): the request was refused before anything ran,
    and the same request may succeed a little later."""


def error_from(msg: dict, rid: str | None = None) -> MinisglError:
    """The exception for an `error` reply: `Overloaded` for a full queue, `MinisglError` otherwise."""
    cls = Overloaded if msg["code"] == "overloaded" else MinisglError
    return cls(msg["code"], msg["message"], rid)


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float | None = 600.0):
        self.address = address
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)
        # Replies that arrived while the caller waited for another request's.
        self._inbox: dict[str | None, deque[dict]] = {}
        # Samples of each request sent with n > 1: how many finals end it.
        self._samples: dict[str, int] = {}
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}"

    # --- sending -------------------------------------------------------------------------------------
    def submit(
        self,
        *,
        text: str | None = None,
        messages: list[dict] | None = None,
        input_ids: list[int] | None = None,
        sampling: dict | None = None,
        stream: bool = True,
        rid: str | None = None,
        n: int = 1,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> str:
        """Sends a generate request of `n` samples and returns its rid; `replies(rid)` reads its replies.
        `tools` (OpenAI's function tools, with `tool_choice` and `parallel_tool_calls`) go to the chat
        template, and the replies carry the calls parsed from the output (docs/protocol.md, "Tool calls")."""
        rid = rid if rid is not None else f"{self._prefix}-{next(self._ids)}"
        msg: dict[str, Any] = {"type": "generate", "rid": rid, "stream": stream, "sampling": sampling or {}}
        if n != 1:
            msg["n"] = n
            self._samples[rid] = n
        if text is not None:
            msg["text"] = text
        if messages is not None:
            msg["messages"] = messages
        if input_ids is not None:
            msg["input_ids"] = list(input_ids)
        for key, value in (
            ("tools", tools),
            ("tool_choice", tool_choice),
            ("parallel_tool_calls", parallel_tool_calls),
        ):
            if value is not None:
                msg[key] = value
        self.send(msg)
        return rid

    def abort(self, rid: str) -> None:
        self.send({"type": "abort", "rid": rid})

    def send(self, msg: dict) -> None:
        self.send_raw(msgpack.packb(msg, use_bin_type=True))

    def send_raw(self, payload: bytes) -> None:
        """Sends bytes as they are: for tests of what the scheduler does with malformed input."""
        self._sock.send(payload)

    # --- receiving -----------------------------------------------------------------------------------
    def recv_any(self, timeout_s: float | None = None) -> dict:
        """The next reply from the socket, whichever request it belongs to."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if timeout_s is not None and not self._sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no reply from {self.address} within {timeout_s} s")
        return msgpack.unpackb(self._sock.recv(), raw=False)

    def next_reply(self, rid: str | None, timeout_s: float | None = None) -> dict:
        """The next reply for `rid` (None: replies without a rid, such as `info`)."""
        queued = self._inbox.get(rid)
        if queued:
            return queued.popleft()
        while True:
            msg = self.recv_any(timeout_s)
            if msg.get("rid") == rid:
                return msg
            self._inbox.setdefault(msg.get("rid"), deque()).append(msg)

    def replies(self, rid: str) -> Iterator[dict]:
        """Yields the deltas and finals of `rid` up to its last final (one per sample); raises MinisglError
        (`Overloaded` when the queue was full) for an error reply."""
        left = self._samples.get(rid, 1)
        while True:
            msg = self.next_reply(rid)
            kind = msg["type"]
            if kind == "final":
                left -= 1
            if kind == "error" or left == 0:
                # The rid may be reused once its request has ended.
                self._inbox.pop(rid, None)
                self._samples.pop(rid, None)
            if kind == "error":
                raise error_from(msg, rid)
            yield msg
            if left == 0:
                return

    # --- conveniences --------------------------------------------------------------------------------
    def generate(self, **request: Any) -> dict:
        """Runs one request to completion and returns its final message."""
        if request.get("n", 1) != 1:
            raise ValueError("a request of n samples has n finals: use samples()")
        rid = self.submit(stream=False, **request)
        return list(self.replies(rid))[-1]

    def samples(self, n: int, **request: Any) -> list[dict]:
        """Runs one request of `n` samples to completion and returns their finals, in index order."""
        rid = self.submit(stream=False, n=n, **request)
        return sorted((m for m in self.replies(rid) if m["type"] == "final"), key=lambda f: f.get("index", 0))

    def stream(self, **request: Any) -> Iterator[dict]:
        rid = self.submit(stream=True, **request)
        yield from self.replies(rid)

    def info(self, timeout_s: float | None = None) -> dict:
        self.send({"type": "info"})
        msg = self.next_reply(None, timeout_s)
        if msg["type"] == "error":
            raise error_from(msg)
        return msg

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
