"""10,000 steps Rust -> Python -> Rust through the two shared-memory rings.

proto/examples/ring_peer.rs plays the scheduler: it creates the rings, publishes pseudo-random steps (every
count from 0 to full capacity) and checks each answer. This process plays the worker: it reads each step
through minisgl.proto and answers with checksums over every field, so that any field that arrives wrong, and
any step lost, repeated or reordered, fails the Rust side. Both sides must also clean up: no segment may be
left in /dev/shm.

Run as a script (`python test_ring_cross_process.py peer <prefix> <stop-after>`), this file is a peer that
dies on purpose after some steps, to check that the Rust side notices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minisgl.proto import PeerDead, ResultWriter, Ring, StepReader, StepView
from minisgl.proto.step import STEP_ARRAYS, STEP_SHUTDOWN

ROOT = Path(__file__).resolve().parents[1]
MOD = 1 << 31
STEPS = 10_000


def peer_binary() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "debug" / "examples" / "ring_peer"
    if not path.exists():
        pytest.fail(f"{path} is not built: run `cargo build --workspace --all-targets` first")
    return path


def answer(step: StepView, seen_before: int) -> np.ndarray:
    """The checksums ring_peer.rs expects (its `expected`): one per request, then one over every array of the
    table (this side's table: an array that only one side has, or reads elsewhere, fails), header, count."""
    n = step.num_reqs
    i64 = np.int64
    w_tok = np.arange(1, step.num_tokens + 1, dtype=i64)
    tok = (
        step.input_ids.astype(i64) * 3 + step.positions.astype(i64) * 5 + step.out_loc.astype(i64) * 7
    ) * w_tok
    kv = step.kv_indices.astype(i64) * 11 * np.arange(1, step.num_kv_indices + 1, dtype=i64)
    tok_sums = np.concatenate([[0], np.cumsum(tok)])
    kv_sums = np.concatenate([[0], np.cumsum(kv)])
    qo, kvp = step.qo_indptr.astype(np.intp), step.kv_indptr.astype(np.intp)
    per_req = (
        tok_sums[qo[1:]]
        - tok_sums[qo[:-1]]
        + kv_sums[kvp[1:]]
        - kv_sums[kvp[:-1]]
        + step.req_slot.astype(i64) * 13
        + step.seq_len.astype(i64) * 17
        + step.kv_last_page_len.astype(i64) * 19
    )
    arrays = 0
    for a, (name, _, _) in enumerate(STEP_ARRAYS):
        words = getattr(step, name).view(np.uint32).astype(i64) % MOD
        arrays += int((words * np.arange(1, len(words) + 1, dtype=i64)).sum()) * (2 * a + 3)
    header = step.kind * 3 + n * 5 + step.num_tokens * 7 + step.num_kv_indices * 11 + step.num_joins * 13
    header += step.num_bias * 19 + (step.step_id % MOD) * 17
    extra = [arrays % MOD, header % MOD, seen_before]
    return np.concatenate([per_req % MOD, extra]).astype(np.int32)


def serve(prefix: str, stop_after: int | None = None) -> int:
    """Answers steps until the shutdown step; returns how many it answered. With stop_after, the process
    exits abruptly after that many (no cleanup, like a crash)."""
    step_ring, result_ring = Ring.open(f"{prefix}-step"), Ring.open(f"{prefix}-result")
    step_ring.attach_reader(0)
    result_ring.attach_writer()
    steps, results = StepReader(step_ring), ResultWriter(result_ring)
    count = 0
    try:
        while True:
            step = steps.wait(timeout=60)
            assert step is not None, "no step within 60 s"
            if step.kind == STEP_SHUTDOWN:
                steps.release()
                return count
            if count == stop_after:
                os._exit(0)
            tokens, step_id = answer(step, count), step.step_id
            del step
            steps.release()
            assert results.write(step_id, tokens, timeout=60)
            count += 1
    finally:
        step_ring.close()
        result_ring.close()


def leftovers(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"{prefix}-*"))


@pytest.fixture
def prefix(request):
    p = f"minisgl-xproc-{os.getpid()}-{request.node.name}"
    yield p
    for name in leftovers(p):  # only after a failure: the assertions below check there are none
        (Path("/dev/shm") / name).unlink(missing_ok=True)


def start_rust(prefix: str, steps: int) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [str(peer_binary()), prefix, str(steps), "20261129"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"ring_peer exited with {proc.returncode}: {proc.stderr.read()}")
    return proc, json.loads(line)


def test_ten_thousand_steps_arrive_intact_and_in_order(prefix):
    proc, names = start_rust(prefix, STEPS)
    t = time.monotonic()
    try:
        assert names == {"step_ring": f"{prefix}-step", "result_ring": f"{prefix}-result"}
        answered = serve(prefix)
        out, err = proc.communicate(timeout=60)
    except Exception as e:
        proc.kill()
        pytest.fail(f"{e!r}; ring_peer said: {proc.communicate()[1]}")
    assert proc.returncode == 0, f"ring_peer failed: {err}"
    summary = json.loads(out)
    assert summary["ok"] and summary["steps"] == STEPS == answered
    assert summary["ring_full"] > 0, "the writer never had to wait: the test did not exercise a full ring"
    assert leftovers(prefix) == [], "segments left in /dev/shm"
    print(f"{STEPS} steps in {time.monotonic() - t:.2f} s; the ring was full {summary['ring_full']} times")


def test_python_notices_a_killed_scheduler(prefix):
    proc, _ = start_rust(prefix, STEPS)
    step_ring = Ring.open(f"{prefix}-step")
    step_ring.attach_reader(0)
    steps = StepReader(step_ring)
    assert steps.wait(timeout=30) is not None
    proc.send_signal(signal.SIGKILL)
    t = time.monotonic()
    try:
        with pytest.raises(PeerDead):
            while True:  # the slots already published can still be read; then the wait notices
                steps.release()
                steps.wait(timeout=10)
        assert time.monotonic() - t < 5
    finally:
        step_ring.close()
        proc.wait()


def test_rust_notices_a_dead_worker(prefix):
    proc, _ = start_rust(prefix, STEPS)
    worker = subprocess.run([sys.executable, __file__, "peer", prefix, "50"], timeout=60)
    assert worker.returncode == 0
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, err
    assert "after 50 of 10000 results" in err and "is gone" in err, err
    assert leftovers(prefix) == [], "the Rust side must unlink its segments even when its peer dies"


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    serve(sys.argv[2], stop_after=int(sys.argv[3]))
