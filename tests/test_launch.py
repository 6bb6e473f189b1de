"""The launcher: serves, stops both processes when one dies (exiting non-zero), drains on the first signal and
stops on the second, and cleans up; its configuration and warnings; `minisgl serve --help` and
`scripts/serve --help` without the venv.

The engines here run a tiny random model with the real tokenizer, so that each start takes seconds, not a
minute.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_tcp_port

from minisgl.cli.chat import sse_data
from minisgl.client import Client, MinisglError
from minisgl.launch import (
    Engine,
    EngineConfig,
    SchedulingConfig,
    exposure_warnings,
    find_scheduler,
    parse_args,
)
from minisgl.logs import JsonFormatter


def launch(model: Path, address: str, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "minisgl", "serve", str(model), "--listen", address]
    cmd += ["--device", "cpu", "--num-pages", "64", "--max-batch", "4", "--log-level", "warn", *extra]
    return subprocess.Popen(cmd, start_new_session=True, **popen)


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


def assert_all_gone(launcher_pid: int, children: list[int]) -> None:
    """Both processes have exited and left no shared-memory segment."""
    assert our_segments(launcher_pid) == []
    for child in children:
        assert not os.path.exists(f"/proc/{child}"), f"process {child} is still there"


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
        assert_all_gone(proc.pid, children)
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
        assert_all_gone(proc.pid, children)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# --- draining -----------------------------------------------------------------------------------------------
def post(port: int, path: str, body: dict) -> tuple[HTTPConnection, object]:
    conn = HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


LONG = {"prompt": "hello", "max_tokens": 900, "ignore_eos": True, "temperature": 0.0, "stream": True}


def test_the_first_sigterm_drains_live_requests_then_exits_0(tiny_model, tmp_path):
    address, port = f"tcp://127.0.0.1:{free_tcp_port()}", free_tcp_port()
    log_path = tmp_path / "log.jsonl"
    with log_path.open("w") as log:
        extra = ("--http", f"127.0.0.1:{port}", "--shutdown-timeout", "60")
        extra += ("--log-format", "json", "--log-level", "info")
        proc = launch(tiny_model, address, *extra, stderr=log)
    try:
        wait_ready(proc, address)
        conn, stream = post(port, "/v1/completions", {**LONG, "stream_options": {"include_usage": True}})
        assert stream.status == 200
        events = sse_data(stream)
        assert json.loads(next(events))["choices"], "the request is live"
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # the launcher passes the signal on; until then new requests are still served
            probe_conn, probe = post(port, "/v1/completions", {**LONG, "max_tokens": 1, "stream": False})
            status = probe.status
            probe_conn.close()
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503, "a draining engine takes no new request"
        with Client(address, timeout_s=30) as client, pytest.raises(MinisglError) as refused:
            client.generate(text="hi", sampling={"max_tokens": 1})
        assert refused.value.code == "shutting_down"
        chunks = [json.loads(data) for data in events if data != "[DONE]"]
        conn.close()
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
        assert finish == "length" and chunks[-1]["usage"]["completion_tokens"] == LONG["max_tokens"]
        assert proc.wait(60) == 0
        assert our_segments(proc.pid) == []
        # Lines that are not logs (a library's own warnings) may come too; every log line is JSON.
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        targets = {line["target"] for line in lines}
        assert {"minisgl.launch", "minisgl.worker"} <= targets
        assert any(t.startswith("minisgl_sched") or "::" in t for t in targets), "the scheduler's too"
        drain = next(line for line in lines if line["message"].startswith("draining: up to 60 s"))
        assert drain["level"] == "INFO" and drain["target"] == "minisgl.launch"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_second_signal_stops_at_once(tiny_model):
    address, port = f"tcp://127.0.0.1:{free_tcp_port()}", free_tcp_port()
    proc = launch(tiny_model, address, "--http", f"127.0.0.1:{port}", "--shutdown-timeout", "60")
    try:
        wait_ready(proc, address)
        children = children_of(proc.pid)
        conn, stream = post(port, "/v1/completions", {**LONG, "max_tokens": 1000})
        next(sse_data(stream))
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "still draining"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        conn.close()
        assert_all_gone(proc.pid, children)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# --- configuration ------------------------------------------------------------------------------------------
def test_the_launchers_default_address_is_the_clients():
    from minisgl.client.client import DEFAULT_ADDRESS

    assert EngineConfig().listen == DEFAULT_ADDRESS


def test_model_is_positional_or_a_flag_but_not_both():
    assert parse_args(["some/dir"]).model == "some/dir"
    assert parse_args(["--model", "other/dir"]).model == "other/dir"
    assert parse_args([]).model == EngineConfig().model
    with pytest.raises(SystemExit):
        parse_args(["some/dir", "--model", "other/dir"])


def test_scheduling_flags_reach_the_scheduler_as_given_and_their_defaults_are_its():
    flags = [
        "--no-prefix-cache",
        "--schedule-policy",
        "lpm",
        "--lpm-max-wait-steps",
        "7",
        "--max-waiting",
        "3",
    ]
    engine = Engine(parse_args(["--sched-bin", "/bin/true", *flags]))
    try:
        sched = engine._commands()["scheduler"]
    finally:
        engine.cleanup()
    start = sched.index("--no-prefix-cache")
    assert sched[start : start + len(flags)] == flags
    with pytest.raises(SystemExit):
        parse_args(["--schedule-policy", "sjf"])
    with pytest.raises(ValueError, match="max_waiting"):
        parse_args(["--max-waiting", "0"])
    # The defaults the launcher passes are the scheduler's own, so `minisgl serve` and minisgl-sched agree.
    try:
        sched_bin = find_scheduler()
    except FileNotFoundError:
        pytest.skip("minisgl-sched is not built")
    help_text = " ".join(
        subprocess.run([sched_bin, "--help"], capture_output=True, text=True, check=True).stdout.split()
    )
    defaults = SchedulingConfig()
    for flag, value in [
        ("--schedule-policy", defaults.schedule_policy),
        ("--lpm-max-wait-steps", defaults.lpm_max_wait_steps),
        ("--max-waiting", defaults.max_waiting),
    ]:
        described = help_text[help_text.index(flag) :]
        assert f"[default: {value}]" in described[: described.index("--", 2)], flag
    assert defaults.prefix_cache and "--no-prefix-cache" in help_text


def test_the_api_key_reaches_only_the_scheduler_and_never_a_command_line(monkeypatch):
    monkeypatch.setenv("MINISGL_API_KEY", "s3cret")
    config = parse_args(["--sched-bin", "/bin/true"])
    assert config.api_key == "s3cret" and "s3cret" not in repr(config)
    engine = Engine(config)
    try:
        assert not any("s3cret" in arg for cmd in engine._commands().values() for arg in cmd)
        envs = engine._environments()
        assert envs["scheduler"]["MINISGL_API_KEY"] == "s3cret"
        assert "MINISGL_API_KEY" not in envs["worker"]
    finally:
        engine.cleanup()
    help_text = subprocess.run(
        [sys.executable, "-m", "minisgl", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "s3cret" not in help_text and "[set]" in help_text


@pytest.mark.parametrize(
    ("listen", "http", "key", "warned"),
    [
        ("tcp://127.0.0.1:5557", "127.0.0.1:8000", None, []),
        ("tcp://localhost:5557", "[::1]:8000", None, []),
        ("ipc:///tmp/x.sock", "off", None, []),
        ("tcp://0.0.0.0:5557", "127.0.0.1:8000", None, ["ZeroMQ"]),
        ("tcp://*:5557", "0.0.0.0:8000", None, ["ZeroMQ", "HTTP"]),
        ("tcp://127.0.0.1:5557", "10.1.2.3:8000", "key", []),
        ("tcp://127.0.0.1:5557", "server.example:8000", None, ["HTTP"]),
    ],
)
def test_warnings_for_sockets_open_to_the_network(listen, http, key, warned):
    warnings = exposure_warnings(EngineConfig(listen=listen, http=http, api_key=key))
    assert [w.split()[1] for w in warnings] == warned


def test_json_logs_are_one_object_per_line():
    import logging

    record = logging.LogRecord("minisgl.launch", logging.WARNING, __file__, 1, "two\nlines %s", ("é",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARN" and entry["target"] == "minisgl.launch"
    assert entry["message"] == "two\nlines é" and entry["timestamp"].endswith("Z")


# --- help without the venv ----------------------------------------------------------------------------------
def test_serve_help_imports_neither_torch_nor_zmq():
    check = (
        "import sys\n"
        "from minisgl.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = {'torch', 'zmq', 'msgpack', 'numpy'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: minisgl serve") and "--shutdown-timeout" in done.stdout


def test_scripts_serve_help_needs_no_setup(tmp_path):
    # A fresh clone, with a setup that records being run: help must answer without it.
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "serve", tmp_path / "scripts" / "serve")
    (tmp_path / "scripts" / "setup").write_text('#!/bin/sh\ntouch "$(dirname "$0")/../setup-ran"\nexit 1\n')
    (tmp_path / "scripts" / "setup").chmod(0o755)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "worker_py" / "minisgl", tmp_path / "worker_py" / "minisgl", ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for flag in ("--help", "-h"):
        start = time.monotonic()
        done = subprocess.run(
            [tmp_path / "scripts" / "serve", "--device", "cpu", flag],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "usage: minisgl serve" in done.stdout and "--max-batch" in done.stdout
        assert time.monotonic() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scripts", "worker_py"], "no setup, no venv"
