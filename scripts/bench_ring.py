#!/usr/bin/env python3
"""Round-trip latency Rust -> Python -> Rust through the two shared-memory rings, both sides spinning.

Launches proto/examples/ring_latency.rs (build it first: `cargo build --release -p minisgl-proto --examples`)
and answers its steps here, through the same classes the worker uses (StepReader, ResultWriter), or with
--raw through the bare ring calls. Prints the latency percentiles the Rust side measured, from before it
claims a step slot to after it reads the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from minisgl.proto import ResultWriter, Ring, StepReader
from minisgl.proto.step import STEP_SHUTDOWN

ROOT = Path(__file__).resolve().parents[1]


def answer_steps(steps: StepReader, results: ResultWriter) -> None:
    """What the worker pays per step around its forward pass: a StepView, a release, a result write."""
    token = np.zeros(1, np.int32)
    while True:
        step = steps.wait()
        if step.kind == STEP_SHUTDOWN:
            steps.release()
            return
        step_id = step.step_id
        token[0] = step_id % (1 << 31)
        steps.release()
        results.write(step_id, token)


def answer_steps_raw(step_ring: Ring, result_ring: Ring) -> None:
    """The rings alone: sequence numbers and the two header words, no views."""
    while True:
        buf = step_ring.wait_read(0)
        step_id, kind = struct.unpack_from("<QI", buf, 0)
        step_ring.release(0)
        if kind == STEP_SHUTDOWN:
            return
        out = result_ring.wait_claim()
        struct.pack_into("<QII", out, 0, step_id, 1, 0)
        struct.pack_into("<i", out, 64, step_id % (1 << 31))
        result_ring.publish()


def serve(prefix: str, raw: bool) -> None:
    step_ring, result_ring = Ring.open(f"{prefix}-step"), Ring.open(f"{prefix}-result")
    step_ring.attach_reader(0)
    result_ring.attach_writer()
    # Spin without ever sleeping: this measures the rings, not the back-off.
    step_ring.spin_s = result_ring.spin_s = 3600.0
    try:
        if raw:
            answer_steps_raw(step_ring, result_ring)
        else:
            answer_steps(StepReader(step_ring), ResultWriter(result_ring))
    finally:
        step_ring.close()
        result_ring.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=10_000)
    ap.add_argument("--profile", default="release", help="cargo profile directory under target/")
    ap.add_argument(
        "--raw",
        action="store_true",
        help="answer with bare ring calls, not the worker's classes",
    )
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = target / args.profile / "examples" / "ring_latency"
    if not binary.exists():
        sys.exit(f"{binary} is not built: cargo build --release -p minisgl-proto --examples")
    prefix = f"minisgl-bench-{os.getpid()}"
    proc = subprocess.Popen(
        [str(binary), prefix, str(args.iterations), str(args.warmup)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        json.loads(proc.stdout.readline())
        serve(prefix, args.raw)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            # Killed, the Rust side could not unlink its segments: do it for it.
            for leftover in Path("/dev/shm").glob(f"{prefix}-*"):
                leftover.unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.exit(f"ring_latency failed with {proc.returncode}")
    stats = json.loads(out)
    peer = "Python, bare ring calls" if args.raw else "Python"
    print(
        f"ring round trip Rust -> {peer} -> Rust, {stats['iterations']} iterations: "
        f"p50 {stats['p50_us']:.2f} us, p99 {stats['p99_us']:.2f} us, p99.9 {stats['p999_us']:.2f} us "
        f"(mean {stats['mean_us']:.2f} us, max {stats['max_us']:.2f} us)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
