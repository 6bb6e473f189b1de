"""A ZeroMQ client of minisgl-sched (docs/protocol.md, section 1).

One DEALER socket carries any number of requests at once; replies are sorted by request id as they arrive, so
several requests can be consumed in any order. A request of `n` samples gets deltas and a final per sample,
each with its sample's `index`; `replies(rid)` ends after the last of the n finals.

Keepalive (on by default, docs/protocol.md): each request asks the scheduler for a heartbeat every 0.5 s, and
the client sends a `keepalive` every 0.5 s while it has live requests, from a background thread when the
caller is busy elsewhere. Waiting for a reply, the client raises `SchedulerGone` once it has heard nothing for
2 s, and the scheduler aborts the requests of a client it has not heard from for 2 s. Closing a `replies()`
generator before its end aborts its request.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgpack
import zmq

from minisgl.proto.messages import abort as abort_message
from minisgl.proto.messages import generate as generate_message

DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"
# The scheduler's pace (scheduler/src/server/liveness.rs): a heartbeat or keepalive every half second, and
# two seconds of silence mean the other side is gone.
KEEPALIVE_INTERVAL_S = 0.5
SILENCE_S = 2.0


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


class SchedulerGone(MinisglError):
    """Nothing came from the scheduler for 2 s while requests of this client were live: it has stopped, been
    killed, or cannot be reached. The requests' fate is unknown; they are not running for this client."""

    def __init__(self, address: str, silent_s: float, rids: list[str]):
        message = (
            f"no heartbeat or reply from the scheduler at {address} for {silent_s:.1f} s with "
            f"{len(rids)} requests live: it is gone"
        )
        super().__init__("scheduler_gone", message, rids[0] if len(rids) == 1 else None)
        self.rids = rids


def error_from(msg: dict, rid: str | None = None) -> MinisglError:
    """The exception for an `error` reply: `Overloaded` for a full queue, `MinisglError` otherwise."""
    cls = Overloaded if msg["code"] == "overloaded" else MinisglError
    return cls(msg["code"], msg["message"], rid)


class _Open:
    """A request sent and not ended, as the socket sees it (whether or not the caller read its replies)."""

    __slots__ = ("finals_left", "keepalive", "discard")

    def __init__(self, n: int, keepalive: bool):
        self.finals_left = n
        self.keepalive = keepalive
        # Its `replies()` was closed early: what still comes for it is dropped.
        self.discard = False


class Client:
    """`timeout_s` bounds every wait for a reply; `keepalive` (see the module's docs) is what lets both sides
    notice the other's death within 2 s, and is the default for every request this client sends."""

    def __init__(
        self, address: str = DEFAULT_ADDRESS, timeout_s: float | None = 600.0, keepalive: bool = True
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.keepalive = keepalive
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
        # The socket is used from the caller's thread and the keepalive thread, never at once.
        self._lock = threading.RLock()
        self._open: dict[str, _Open] = {}
        self._keepalive_live = 0
        self._last_heard = time.monotonic()
        self._last_sent = 0.0
        self._closed = threading.Event()
        self._pinger: threading.Thread | None = None

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
        keepalive: bool | None = None,
    ) -> str:
        """Sends a generate request of `n` samples and returns its rid; `replies(rid)` reads its replies.
        Exactly one of text, messages, input_ids; sampling keys as in docs/protocol.md (others are a
        ValueError here, before anything is sent).
        `tools` (OpenAI's function tools, with `tool_choice` and `parallel_tool_calls`) go to the chat
        template, and the replies carry the calls parsed from the output (docs/protocol.md, "Tool calls").
        `keepalive` defaults to the client's."""
        rid = rid if rid is not None else f"{self._prefix}-{next(self._ids)}"
        keepalive = self.keepalive if keepalive is None else keepalive
        msg = generate_message(
            rid,
            text=text,
            messages=messages,
            input_ids=None if input_ids is None else list(input_ids),
            sampling=sampling,
            stream=stream,
            n=n,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            keepalive=keepalive,
        )
        if n != 1:
            self._samples[rid] = n
        with self._lock:
            if rid not in self._open:
                self._track(rid, _Open(n, keepalive))
            self.send(msg)
        if keepalive:
            self._start_pinger()
        return rid

    def abort(self, rid: str) -> None:
        self.send(abort_message(rid))

    def send(self, msg: dict) -> None:
        self.send_raw(msgpack.packb(msg, use_bin_type=True))

    def send_raw(self, payload: bytes) -> None:
        """Sends bytes as they are: for tests of what the scheduler does with malformed input."""
        with self._lock:
            self._sock.send(payload)
            self._last_sent = time.monotonic()

    # --- liveness ------------------------------------------------------------------------------------
    def _track(self, rid: str, state: _Open) -> None:
        if not self._open and not self._keepalive_live:
            # Silence before a request was live says nothing about the scheduler.
            self._last_heard = time.monotonic()
        self._open[rid] = state
        self._keepalive_live += state.keepalive

    def _untrack(self, rid: str) -> None:
        state = self._open.pop(rid, None)
        if state is not None:
            self._keepalive_live -= state.keepalive

    def _start_pinger(self) -> None:
        if self._pinger is None:
            self._pinger = threading.Thread(target=self._ping, name="minisgl-keepalive", daemon=True)
            self._pinger.start()

    def _ping(self) -> None:
        """Sends the keepalives while the caller is away from the client (busy with a delta, say): while it
        waits in the client, the waiting thread sends them itself."""
        while not self._closed.wait(KEEPALIVE_INTERVAL_S / 2):
            if not self._keepalive_live or not self._lock.acquire(blocking=False):
                continue
            try:
                if not self._closed.is_set():
                    self._keepalive_if_due()
            except zmq.ZMQError:
                return
            finally:
                self._lock.release()

    def _keepalive_if_due(self) -> None:
        if self._keepalive_live and time.monotonic() - self._last_sent >= KEEPALIVE_INTERVAL_S:
            self.send({"type": "keepalive"})

    def _heard(self, msg: dict) -> None:
        """Notes a message's news about its request: a final or an error may end it."""
        self._last_heard = time.monotonic()
        rid = msg.get("rid")
        state = self._open.get(rid)
        if state is None:
            return
        kind = msg.get("type")
        if kind == "final":
            state.finals_left -= 1
        # A duplicate rid's refusal is about the new message, not the live request.
        ended = state.finals_left <= 0 or (kind == "error" and msg.get("code") != "duplicate_request")
        if ended:
            self._untrack(rid)

    # --- receiving -----------------------------------------------------------------------------------
    def recv_any(self, timeout_s: float | None = None) -> dict:
        """The next reply from the socket, whichever request it belongs to (heartbeats are taken here).
        Raises `TimeoutError` past `timeout_s`, and `SchedulerGone` after 2 s without a word from the
        scheduler while a keepalive request is live."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        with self._lock:
            while True:
                now = time.monotonic()
                waits = [] if deadline is None else [deadline - now]
                if self._keepalive_live:
                    self._keepalive_if_due()
                    # Silence counts from when the caller started waiting, at the earliest: replies queued
                    # while it was away are read first.
                    silent = now - max(self._last_heard, start)
                    if silent > SILENCE_S:
                        live = [rid for rid, state in self._open.items() if state.keepalive]
                        raise SchedulerGone(self.address, silent, live)
                    waits += [SILENCE_S - silent + 0.01, self._last_sent + KEEPALIVE_INTERVAL_S - now]
                wait_ms = None if not waits else max(0, int(min(waits) * 1000) + 1)
                if self._sock.poll(wait_ms):
                    msg = msgpack.unpackb(self._sock.recv(), raw=False)
                    state = self._open.get(msg.get("rid"))
                    self._heard(msg)
                    if msg.get("type") == "heartbeat" or (state is not None and state.discard):
                        continue
                    return msg
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no reply from {self.address} within {timeout_s} s")

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
        (`Overloaded` when the queue was full) for an error reply. Closed before its end (`close()`, or
        dropped mid-loop), it aborts the request and drops whatever still comes for it."""
        left = self._samples.get(rid, 1)
        done = False
        try:
            while True:
                msg = self.next_reply(rid)
                kind = msg["type"]
                if kind == "final":
                    left -= 1
                if kind == "error" or left == 0:
                    done = True
                    # The rid may be reused once its request has ended.
                    self._inbox.pop(rid, None)
                    self._samples.pop(rid, None)
                if kind == "error":
                    raise error_from(msg, rid)
                yield msg
                if left == 0:
                    return
        except SchedulerGone:
            done = True  # nobody to tell
            raise
        finally:
            if not done:
                self._give_up(rid)

    def _give_up(self, rid: str) -> None:
        """Aborts `rid` for a caller that stopped reading it, and drops its replies from here on."""
        self._inbox.pop(rid, None)
        self._samples.pop(rid, None)
        state = self._open.get(rid)
        if state is None:
            return  # it ended meanwhile
        state.discard = True
        with contextlib.suppress(zmq.ZMQError):
            self.abort(rid)

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
        self._closed.set()
        with self._lock:
            self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
