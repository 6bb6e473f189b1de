"""The Python side of the ring, within one process. The scheduler normally creates the segment; here a small
helper writes one by hand from the protocol's header table, which also checks ring.py against the table."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minisgl.proto import PeerDead, ResultWriter, Ring, RingError, StepReader
from minisgl.proto.ring import VERSION, process_alive, unix_ms
from minisgl.proto.step import (
    STEP_DECODE,
    Capacity,
    ResultLayout,
    ResultSlot,
    StepLayout,
    StepSlot,
)

CAP = Capacity(4, 8, 6)


def make_segment(name: str, kind: int, slot_count: int, slot_bytes: int, num_readers: int = 1) -> Path:
    path = Path("/dev/shm") / name
    header = bytearray(512)
    struct.pack_into(
        "<8sIIIIII", header, 0, b"MSGLRING", VERSION, kind, 512, slot_count, slot_bytes, num_readers
    )
    struct.pack_into("<IIII", header, 48, CAP.max_reqs, CAP.max_tokens, CAP.max_kv_indices, 16)
    path.write_bytes(bytes(header) + bytes(slot_count * slot_bytes))
    return path


@pytest.fixture
def segment(request):
    """Makes segments named after the test, and removes them afterwards (the scheduler's job in real use)."""
    made: list[Path] = []

    def make(kind: int = 2, slot_count: int = 4, num_readers: int = 1, tag: str = "") -> str:
        name = f"minisgl-pytest-{os.getpid()}-{request.node.name}{tag}"
        slot_bytes = StepLayout(CAP).slot_bytes if kind == 1 else ResultLayout(CAP).slot_bytes
        made.append(make_segment(name, kind, slot_count, slot_bytes, num_readers))
        return name

    yield make
    for p in made:
        p.unlink(missing_ok=True)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_open_reads_the_header_and_close_keeps_the_segment(segment):
    name = segment(kind=1, slot_count=3, num_readers=2)
    ring = Ring.open(name)
    assert (ring.kind, ring.slot_count, ring.slot_bytes, ring.num_readers) == (1, 3, 11136, 2)
    assert (ring.capacity, ring.page_size) == (CAP, 16)
    assert (ring.write_seq, ring.read_seq(0), ring.read_seq(1), ring.writer_pid) == (0, 0, 0, 0)
    ring.attach_reader(1, 777)
    ring.attach_writer()
    assert (ring.reader_pid(1), ring.reader_pid(0), ring.writer_pid) == (777, 0, os.getpid())
    assert abs(ring.writer_heartbeat_ms - unix_ms()) < 10_000
    raw = (Path("/dev/shm") / name).read_bytes()
    assert struct.unpack_from("<I", raw, 32)[0] == os.getpid()
    assert struct.unpack_from("<I", raw, 136 + 64)[0] == 777
    with pytest.raises(RingError):
        ring.read_seq(2)
    ring.close()
    ring.close()
    assert ring.closed
    assert (Path("/dev/shm") / name).exists(), "the worker never unlinks"


def test_close_with_views_still_held_does_not_fail(segment):
    ring = Ring.open(segment())
    slot = ring.try_claim()
    ring.close()
    slot[0] = 1  # the mapping lives on while a view does
    del slot


def test_foreign_or_missing_segments_are_refused(segment):
    name = segment()
    path = Path("/dev/shm") / name
    raw = bytearray(path.read_bytes())
    raw[8] = 2
    path.write_bytes(bytes(raw))
    with pytest.raises(RingError, match="version 2"):
        Ring(name)
    raw[0] = 0
    path.write_bytes(bytes(raw))
    with pytest.raises(RingError, match="not a minisgl ring"):
        Ring(name)
    path.write_bytes(b"MSGLRING")
    with pytest.raises(RingError, match="smaller than a ring header"):
        Ring(name)
    with pytest.raises(FileNotFoundError):
        Ring(name + "-missing")


def test_a_slot_goes_round_writer_to_reader(segment):
    name = segment(slot_count=2, num_readers=2)
    writer, readers = Ring(name), Ring(name)
    layout = ResultLayout(CAP)
    for step in range(2):
        ResultSlot(layout, writer.try_claim()).write(step, np.array([step, -step], np.int32))
        writer.publish()
    assert writer.try_claim() is None, "both slots are unread"
    assert writer.wait_claim(timeout=0.01) is None
    for reader in range(2):
        for step in range(2):
            assert readers.read_seq(reader) == step
            step_id, status, tokens = ResultSlot(layout, readers.try_read(reader)).read()
            assert (step_id, status, tokens.tolist()) == (step, 0, [step, -step])
            readers.release(reader)
        assert readers.try_read(reader) is None
        assert readers.wait_read(reader, timeout=0.01) is None
        with pytest.raises(RingError, match="not published"):
            readers.release(reader)
    assert writer.try_claim() is writer.slot(2)
    with pytest.raises(RingError, match="without a claimed slot"):
        Ring(name).publish()


def test_threads_pass_many_steps_in_order(segment):
    name = segment(kind=1, slot_count=3)
    writer, reader = Ring(name), Ring(name)
    layout = StepLayout(CAP)
    n_steps = 2000
    seen: list[tuple[int, int]] = []

    def consume():
        steps = StepReader(reader)
        for _ in range(n_steps):
            step = steps.wait(timeout=10)
            seen.append((step.step_id, int(step.input_ids.sum())))
            steps.release()

    t = threading.Thread(target=consume)
    t.start()
    slots = [StepSlot(layout, writer.slot(i)) for i in range(writer.slot_count)]
    for step_id in range(n_steps):
        assert writer.wait_claim(timeout=10) is not None
        s = slots[step_id % writer.slot_count]
        s.input_ids[: step_id % 9] = step_id
        s.write_header(step_id, STEP_DECODE, 0, step_id % 9, 0, 0)
        writer.publish()
    t.join(timeout=30)
    assert seen == [(i, i * (i % 9)) for i in range(n_steps)]


def test_a_dead_peer_raises_and_a_live_one_times_out(segment):
    name = segment(slot_count=1)
    ring = Ring(name)
    ring.attach_writer(dead_pid())
    t = time.monotonic()
    with pytest.raises(PeerDead, match="writer"):
        ring.wait_read(0)
    assert time.monotonic() - t < 1
    ring.attach_writer()
    assert ring.wait_read(0, timeout=0.02) is None

    assert ring.try_claim() is not None
    ring.publish()
    ring.attach_reader(0, dead_pid())
    with pytest.raises(PeerDead, match="reader 0"):
        ring.wait_claim()
    ring.attach_reader(0)
    ring.heartbeat_timeout_s = 0.5
    ring._u64[(144) // 8] = unix_ms() - 5_000  # reader 0's heartbeat, long ago
    with pytest.raises(PeerDead, match="heartbeat"):
        ring.wait_claim(timeout=1)


def test_a_wait_sleeps_at_most_a_sixteenth_of_the_time_waited(segment, monkeypatch):
    """Doubling alone would reach 1 ms naps 1.3 ms into a wait; capped at a sixteenth of the wait, a step
    published 3 ms into an idle spell is read within ~0.2 ms of it (issue 12: the hand-off of a prefill)."""
    from minisgl.proto import ring as ring_module

    ring = Ring(segment(slot_count=1))
    ring.attach_writer()
    naps: list[tuple[float, float]] = []  # (seconds waited when the nap began, the nap)
    start = time.perf_counter()
    real_sleep = time.sleep
    monkeypatch.setattr(
        ring_module.time, "sleep", lambda s: naps.append((time.perf_counter() - start, s)) or real_sleep(s)
    )
    assert ring.wait_read(0, timeout=0.005) is None
    assert naps and all(nap <= max(waited / 16, 20e-6) * 1.01 for waited, nap in naps), naps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is Linux's")
def test_a_thread_that_sleeps_in_a_wait_asks_for_precise_wakeups(segment):
    import ctypes

    from minisgl.proto.ring import TIMER_SLACK_NS

    pr_set_timerslack, pr_get_timerslack = 29, 30
    slack = []

    def wait() -> None:
        # A new thread inherits its creator's slack, which an earlier wait in this process may have set.
        ctypes.CDLL(None).prctl(pr_set_timerslack, ctypes.c_ulong(50_000), 0, 0, 0)
        slack.append(ctypes.CDLL(None).prctl(pr_get_timerslack, 0, 0, 0, 0))
        ring = Ring(segment(slot_count=1))
        ring.attach_writer()
        assert ring.wait_read(0, timeout=0.002) is None
        slack.append(ctypes.CDLL(None).prctl(pr_get_timerslack, 0, 0, 0, 0))

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join()
    assert slack[0] != TIMER_SLACK_NS and slack[1] == TIMER_SLACK_NS, slack


def test_process_alive_sees_zombies_as_dead():
    assert process_alive(os.getpid())
    assert not process_alive(0)
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while process_alive(p.pid):  # exits, then stays a zombie until waited for
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.wait()
    assert not process_alive(p.pid)


def test_channels_check_the_ring_kind(segment):
    step_ring, result_ring = Ring(segment(kind=1, tag="-s")), Ring(segment(kind=2, tag="-r"))
    with pytest.raises(RingError, match="not a step ring"):
        StepReader(result_ring)
    with pytest.raises(RingError, match="not a result ring"):
        ResultWriter(step_ring)
    results = ResultWriter(result_ring)
    assert results.write(3, np.array([5, 6], np.int32))
    assert results.write(4, None, status=1)
    layout = ResultLayout(CAP)
    assert ResultSlot(layout, result_ring.slot(0)).read()[:2] == (3, 0)
    step_id, status, tokens = ResultSlot(layout, result_ring.slot(1)).read()
    assert (step_id, status, len(tokens)) == (4, 1, 0)
