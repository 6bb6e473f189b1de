"""A ZeroMQ client of minisgl-sched (docs/protocol.md, section 1).

One DEALER socket carries any number of requests at once; replies are sorted by request id as they arrive, so
several requests can be consumed in any order.
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
    ) -> str:
        """Sends a generate request and returns its rid; read its replies with `replies(rid)`."""
        rid = rid if rid is not None else f"{self._prefix}-{next(self._ids)}"
        msg: dict[str, Any] = {"type": "generate", "rid": rid, "stream": stream, "sampling": sampling or {}}
        if text is not None:
            msg["text"] = text
        if messages is not None:
            msg["messages"] = messages
        if input_ids is not None:
            msg["input_ids"] = list(input_ids)
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
        """Yields the deltas of `rid`, then its final; raises MinisglError for an error reply."""
        while True:
            msg = self.next_reply(rid)
            kind = msg["type"]
            if kind == "error":
                self._inbox.pop(rid, None)
                raise MinisglError(msg["code"], msg["message"], rid)
            yield msg
            if kind == "final":
                self._inbox.pop(rid, None)
                return

    # --- conveniences --------------------------------------------------------------------------------
    def generate(self, **request: Any) -> dict:
        """Runs one request to completion and returns its final message."""
        rid = self.submit(stream=False, **request)
        return list(self.replies(rid))[-1]

    def stream(self, **request: Any) -> Iterator[dict]:
        rid = self.submit(stream=True, **request)
        yield from self.replies(rid)

    def info(self, timeout_s: float | None = None) -> dict:
        self.send({"type": "info"})
        msg = self.next_reply(None, timeout_s)
        if msg["type"] == "error":
            raise MinisglError(msg["code"], msg["message"])
        return msg

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
