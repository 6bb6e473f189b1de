"""The worker's side of a shared-memory ring (docs/protocol.md, section 3).

The scheduler creates the segment `/dev/shm/<name>` and unlinks it; this module only maps it (os.open + mmap,
not multiprocessing.shared_memory, whose resource tracker would unlink the segment when this process exits)
and never unlinks it.

Sequence numbers are read and written through a numpy uint64 view of the header. Python has no atomic loads
or stores with ordering, but on x86 (total store order) aligned 8-byte loads and stores are single
instructions and are not reordered with each other, which is all the protocol needs: a writer's slot stores
become visible before its write-sequence store, and a reader's slot loads happen before its read-sequence
store. ARM (e.g. GH200 hosts) would need explicit fences around these accesses; we do not support it yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import threading
import time

import numpy as np

from minisgl.proto.step import Capacity

MAGIC = int.from_bytes(b"MSGLRING", "little")
VERSION = 4  # proto/src/ring/header.rs says what changed
HEADER_BYTES = 512
MAX_READERS = 4

RING_STEP = 1
RING_RESULT = 2

# Header word indices: _W64 into the u64 view, _W32 into the u32 view (byte offset / 8 or / 4).
_W64_WRITER_HEARTBEAT = 40 // 8
_W64_WRITE_SEQ = 64 // 8
_W32_WRITER_PID = 32 // 4


def _w64_read_seq(i: int) -> int:
    return (128 + 64 * i) // 8


def _w32_reader_pid(i: int) -> int:
    return (136 + 64 * i) // 4


def _w64_reader_heartbeat(i: int) -> int:
    return (144 + 64 * i) // 8


# magic, version, kind, header bytes, slot count, slot bytes, readers (offsets 0..32)
_SHAPE = struct.Struct("<QIIIIII")
# R, T, K, page size (offsets 48..64)
_CAPACITY = struct.Struct("<IIII")
_MASK_WORDS = struct.Struct("<I")  # at 72, beside the write sequence: the first 64 bytes were full

DEFAULT_SPIN_S = 50e-6
_FIRST_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
# A sleep is at most this fraction of the wait so far (as in the scheduler's Backoff): a step published 2 ms
# into an idle spell is read within ~0.13 ms, not up to 1 ms later.
_SLEEP_FRACTION = 16
# A liveness check costs a syscall and a /proc read; every 2 ms notices a death promptly enough.
_CHECK_EVERY_NS = 2_000_000
# Linux wakes a sleeping thread up to its timer slack late, 50 us unless asked otherwise: a 20 us nap took
# ~90 us. A thread that sleeps in a wait asks for 1 us (TIMER_SLACK_NS in the scheduler's proto/ring/wait.rs).
TIMER_SLACK_NS = 1_000
_PR_SET_TIMERSLACK = 29
_precise = threading.local()


def precise_sleeps() -> None:
    """Sets this thread's timer slack to TIMER_SLACK_NS, once per thread (Linux; elsewhere nothing)."""
    if getattr(_precise, "done", False):
        return
    _precise.done = True
    with contextlib.suppress(OSError, AttributeError):  # no libc prctl: the naps are just less precise
        ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(TIMER_SLACK_NS), 0, 0, 0)


class RingError(RuntimeError):
    """The segment is not a ring this code understands, or the ring was misused."""


class PeerDead(RingError):
    """The process on the other side of the ring is gone (or stopped sending heartbeats)."""


def unix_ms() -> int:
    return time.time_ns() // 1_000_000


def process_alive(pid: int) -> bool:
    """Whether `pid` names a running process. A zombie (exited, not yet reaped) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return not os.path.exists("/proc/self")
    except OSError:
        return True
    # The state letter follows the command name, which is in parentheses and may itself contain ") ".
    state = stat[stat.rfind(b") ") + 2 : stat.rfind(b") ") + 3]
    return state not in (b"Z", b"X")


class Ring:
    """A mapped ring: one writer and up to four readers, coordinated by the header's sequence numbers.

    Slots are addressed by sequence number (`seq`), as the protocol does: slot `seq % slot_count`.
    """

    def __init__(self, name: str):
        """Maps `/dev/shm/<name>` and checks its header; raises RingError if it is not a ring of this
        version, FileNotFoundError if there is no such segment."""
        self.name = name
        path = os.path.join("/dev/shm", name.lstrip("/"))
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise RingError(f"{path}: {size} bytes, smaller than a ring header")
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)  # the mapping keeps its own reference to the segment
        try:
            self._read_header(path, size)
        except BaseException:
            self._mm.close()
            raise
        self._u64 = np.frombuffer(self._mm, dtype="<u8", count=HEADER_BYTES // 8)
        self._u32 = np.frombuffer(self._mm, dtype="<u4", count=HEADER_BYTES // 4)
        self._slots = [
            np.frombuffer(
                self._mm, dtype=np.uint8, count=self.slot_bytes, offset=HEADER_BYTES + i * self.slot_bytes
            )
            for i in range(self.slot_count)
        ]
        self._read_seq_words = [_w64_read_seq(i) for i in range(self.num_readers)]
        self._claimed = False
        self.spin_s = DEFAULT_SPIN_S
        """How long a wait spins before it starts sleeping; raise it only when both sides spin on purpose."""
        self.heartbeat_timeout_s: float | None = None
        """When set, a peer whose heartbeat is older than this many seconds counts as dead too."""

    def _read_header(self, path: str, size: int) -> None:
        magic, version, kind, header_bytes, slot_count, slot_bytes, num_readers = _SHAPE.unpack_from(
            self._mm, 0
        )
        r, t, k, page = _CAPACITY.unpack_from(self._mm, 48)
        if magic != MAGIC:
            raise RingError(f"{path}: not a minisgl ring (magic {magic:#018x})")
        if version != VERSION:
            raise RingError(f"{path}: ring layout version {version}, this code speaks {VERSION}")
        if header_bytes != HEADER_BYTES or kind not in (RING_STEP, RING_RESULT):
            raise RingError(f"{path}: bad header (header bytes {header_bytes}, kind {kind})")
        if slot_count == 0 or slot_bytes % 64 or not 1 <= num_readers <= MAX_READERS or page == 0:
            raise RingError(
                f"{path}: bad header ({slot_count} slots of {slot_bytes} bytes, {num_readers} readers)"
            )
        if size < HEADER_BYTES + slot_count * slot_bytes:
            raise RingError(
                f"{path}: {size} bytes, its header describes {HEADER_BYTES + slot_count * slot_bytes}"
            )
        self.kind = kind
        self.slot_count = slot_count
        self.slot_bytes = slot_bytes
        self.num_readers = num_readers
        (mask_words,) = _MASK_WORDS.unpack_from(self._mm, 72)
        self.capacity = Capacity(r, t, k, mask_words)
        self.page_size = page

    @classmethod
    def open(cls, name: str) -> Ring:
        return cls(name)

    # --- lifetime ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmaps the segment (never unlinks it). Views still held elsewhere keep the mapping alive until
        they are gone; the ring itself is unusable after this."""
        if self._mm is None:
            return
        mm, self._mm = self._mm, None
        self._u64 = self._u32 = None
        self._slots = []
        with contextlib.suppress(BufferError):
            mm.close()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._mm is None

    # --- header --------------------------------------------------------------------------------------------

    def _check_reader(self, reader: int) -> None:
        if not 0 <= reader < self.num_readers:
            raise RingError(f"reader {reader} of a ring with {self.num_readers} readers")

    @property
    def write_seq(self) -> int:
        """Slots published so far."""
        return self._u64.item(_W64_WRITE_SEQ)

    def read_seq(self, reader: int) -> int:
        """Slots reader `reader` has released; its next slot has this sequence number."""
        self._check_reader(reader)
        return self._u64.item(_w64_read_seq(reader))

    @property
    def writer_pid(self) -> int:
        return self._u32.item(_W32_WRITER_PID)

    @property
    def writer_heartbeat_ms(self) -> int:
        return self._u64.item(_W64_WRITER_HEARTBEAT)

    def reader_pid(self, reader: int) -> int:
        self._check_reader(reader)
        return self._u32.item(_w32_reader_pid(reader))

    def reader_heartbeat_ms(self, reader: int) -> int:
        self._check_reader(reader)
        return self._u64.item(_w64_reader_heartbeat(reader))

    def attach_writer(self, pid: int | None = None) -> None:
        """Records the writer's pid (default: this process) so that readers can tell when it dies."""
        self.heartbeat_writer()
        self._u32[_W32_WRITER_PID] = os.getpid() if pid is None else pid

    def attach_reader(self, reader: int, pid: int | None = None) -> None:
        """Records reader `reader`'s pid (default: this process) so that the writer can tell when it dies."""
        self._check_reader(reader)
        self.heartbeat_reader(reader)
        self._u32[_w32_reader_pid(reader)] = os.getpid() if pid is None else pid

    def heartbeat_writer(self) -> None:
        self._u64[_W64_WRITER_HEARTBEAT] = unix_ms()

    def heartbeat_reader(self, reader: int) -> None:
        self._u64[_w64_reader_heartbeat(reader)] = unix_ms()

    def slot(self, seq: int) -> np.ndarray:
        """The bytes of the slot for sequence number `seq` (a uint8 view into the segment)."""
        return self._slots[seq % self.slot_count]

    # --- liveness ------------------------------------------------------------------------------------------

    def _check_peer(self, who: str, pid: int, heartbeat_ms: int) -> None:
        if pid == 0:
            return  # not attached yet
        if not process_alive(pid):
            raise PeerDead(f"{who} of ring {self.name} (pid {pid}) is gone")
        limit = self.heartbeat_timeout_s
        if limit is not None and heartbeat_ms and unix_ms() - heartbeat_ms > limit * 1000:
            raise PeerDead(f"{who} of ring {self.name} (pid {pid}) sent no heartbeat for {limit} s")

    def check_writer(self) -> None:
        """Raises PeerDead if the attached writer is gone."""
        self._check_peer("writer", self.writer_pid, self.writer_heartbeat_ms)

    def check_readers(self) -> None:
        """Raises PeerDead if an attached reader is gone."""
        for i in range(self.num_readers):
            self._check_peer(f"reader {i}", self.reader_pid(i), self.reader_heartbeat_ms(i))

    def _wait(self, ready, timeout: float | None, on_check) -> bool:
        """Spins `spin_s`, then sleeps in doubling steps up to 1 ms (and up to a sixteenth of the wait so
        far), until ready() is true. Returns False on timeout; on_check() (liveness, heartbeat) runs at the
        end of the spin and then every 2 ms."""
        start = time.perf_counter_ns()
        spin_until = start + int(self.spin_s * 1e9)
        deadline = None if timeout is None else start + int(timeout * 1e9)
        next_check = 0
        sleep_s = _FIRST_SLEEP_S
        while not ready():
            now = time.perf_counter_ns()
            if deadline is not None and now >= deadline:
                return False
            if now < spin_until:
                continue
            if now >= next_check:
                on_check()
                next_check = now + _CHECK_EVERY_NS
            precise_sleeps()
            time.sleep(sleep_s)
            waited_s = (now - start) * 1e-9
            sleep_s = min(sleep_s * 2, _MAX_SLEEP_S, max(waited_s / _SLEEP_FRACTION, _FIRST_SLEEP_S))
        return True

    # --- readers -------------------------------------------------------------------------------------------

    def try_read(self, reader: int) -> np.ndarray | None:
        """Reader `reader`'s next slot (its bytes, a view into the segment), if the writer has published it.
        The slot's sequence number is `read_seq(reader)`; the bytes stay valid until `release(reader)`."""
        nxt = self._u64.item(_w64_read_seq(reader))
        return self._slots[nxt % self.slot_count] if self._u64.item(_W64_WRITE_SEQ) > nxt else None

    def wait_read(self, reader: int, timeout: float | None = None) -> np.ndarray | None:
        """`try_read`, waiting up to `timeout` seconds (None: as long as the writer lives). Returns None on
        timeout; raises PeerDead when the writer is gone."""
        self._check_reader(reader)
        w64 = self._u64
        nxt = w64.item(_w64_read_seq(reader))
        if w64.item(_W64_WRITE_SEQ) > nxt:
            return self._slots[nxt % self.slot_count]

        def ready() -> bool:
            return w64.item(_W64_WRITE_SEQ) > nxt

        def on_check() -> None:
            self.heartbeat_reader(reader)
            self.check_writer()

        return self._slots[nxt % self.slot_count] if self._wait(ready, timeout, on_check) else None

    def release(self, reader: int) -> None:
        """Hands reader `reader`'s current slot back to the writer."""
        self._check_reader(reader)
        rs = _w64_read_seq(reader)
        nxt = self._u64.item(rs)
        if nxt >= self._u64.item(_W64_WRITE_SEQ):
            raise RingError(f"reader {reader} released slot {nxt}, which is not published")
        self._u64[rs] = nxt + 1
        self.heartbeat_reader(reader)

    # --- writer --------------------------------------------------------------------------------------------

    def _claimable(self) -> bool:
        w64 = self._u64
        w = w64.item(_W64_WRITE_SEQ)
        oldest = min([w64.item(i) for i in self._read_seq_words])
        return 0 <= w - oldest < self.slot_count

    def try_claim(self) -> np.ndarray | None:
        """The slot to fill next (its bytes), when every reader is done with it. Its sequence number is
        `write_seq`. Claiming again before `publish` returns the same slot."""
        if self._claimed or self._claimable():
            self._claimed = True
            return self._slots[self._u64.item(_W64_WRITE_SEQ) % self.slot_count]
        return None

    def wait_claim(self, timeout: float | None = None) -> np.ndarray | None:
        """`try_claim`, waiting up to `timeout` seconds (None: as long as the readers live). Returns None on
        timeout; raises PeerDead when a reader is gone."""

        def on_check() -> None:
            self.heartbeat_writer()
            self.check_readers()

        if self._claimed or self._wait(self._claimable, timeout, on_check):
            self._claimed = True
            return self._slots[self._u64.item(_W64_WRITE_SEQ) % self.slot_count]
        return None

    def publish(self) -> None:
        """Makes the claimed slot visible to the readers."""
        if not self._claimed:
            raise RingError("publish without a claimed slot")
        self._claimed = False
        self._u64[_W64_WRITE_SEQ] = self._u64.item(_W64_WRITE_SEQ) + 1
        self.heartbeat_writer()
