"""The launcher: serves, stops both processes when one dies (exiting non-zero), and cleans up on Ctrl-C.

These run a tiny random model with the real tokenizer so that each start takes seconds, not a minute.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_tcp_port

from minisgl.client import Client


def launch(model: Path, address: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "minisgl.launch", "--model", str(model), "--listen", address]
    cmd += ["--device", "cpu", "--num-pages", "64", "--max-batch", "4", "--log-level", "warn"]
    return subprocess.Popen(cmd, start_new_session=True)


def wait_ready(proc: subprocess.Popen, address: str) -> dict:
    with Client(address) as client:
        client.send({"type": "info"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the launcher exited with {proc.returncode} before it was ready"
            try:
                return client.next_reply(None, timeout_s=0.5)
            except TimeoutError:
                pass
    raise TimeoutError("not ready")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def our_segments(launcher_pid: int) -> list[str]:
    return glob.glob(f"/dev/shm/minisgl-{launcher_pid}-*")


def test_serves_and_stops_cleanly_on_ctrl_c(tiny_model):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    proc = launch(tiny_model, address)
    try:
        wait_ready(proc, address)
        assert len(our_segments(proc.pid)) == 2, "a step ring and a result ring while serving"
        with Client(address) as client:
            final = client.generate(text="hello", sampling={"temperature": 0.0, "max_tokens": 4})
        assert final["finish_reason"] == "length"
        children = children_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert our_segments(proc.pid) == []
        for child in children:
            assert not os.path.exists(f"/proc/{child}"), "both processes are gone"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("victim", ["worker", "scheduler"])
def test_a_dead_process_stops_the_other_and_the_launcher_fails(tiny_model, victim):
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    proc = launch(tiny_model, address)
    try:
        wait_ready(proc, address)
        children = children_of(proc.pid)
        assert len(children) == 2
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
        target = next(
            pid for pid, cmd in cmdlines.items() if (b"minisgl.worker" in cmd) == (victim == "worker")
        )
        os.kill(target, signal.SIGKILL)
        assert proc.wait(60) != 0
        assert our_segments(proc.pid) == []
        for child in children:
            assert not os.path.exists(f"/proc/{child}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
