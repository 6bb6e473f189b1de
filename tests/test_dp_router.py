"""Data parallelism: `minisgl serve-dp` runs two engines of the real default model (CPU, fp32) behind
sglang-router (round robin), with an API key. 64 concurrent requests through the router each give exactly
the greedy tokens the same request gives alone, and both engines serve some; the router reaches the
engines' /server_info with the key; an engine killed with SIGKILL is dropped by the router's health checks
within seconds while every request keeps being answered; Ctrl-C stops everything and leaves no process and
no shared-memory segment.

The tests share one deployment and run in file order: the kill and the Ctrl-C come last.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_tcp_port

KEY = "dp-test-key"
HEALTH_INTERVAL_S = 1
HEALTH_FAILURES = 2
TOPICS = ["binary search", "TCP", "photosynthesis", "linked lists", "the Moon", "primes", "tea", "rust"]


def two_free_ports() -> int:
    """A port p with p + 1 free too (the engines take consecutive ports)."""
    for _ in range(50):
        p = free_tcp_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


def call(url: str, path: str, body: dict | None = None, key: str | None = KEY, timeout: float = 120):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [d for k in kids for d in descendants(k)]


# --- without engines ---------------------------------------------------------------------------------------
def test_engines_get_their_gpus_and_the_router_its_flags_without_the_key():
    from minisgl.dp import DPConfig, engine_urls, gpu_groups, router_command
    from minisgl.launch import EngineConfig

    two = DPConfig(dp=2, engine_port=9000, gpus="4,5,6,7")
    assert gpu_groups(two, EngineConfig(device="cuda", tp=2)) == ["4,5", "6,7"]
    assert gpu_groups(two, EngineConfig(device="cuda")) == ["4", "5"]
    assert gpu_groups(two, EngineConfig(device="cpu")) is None
    with pytest.raises(ValueError, match="2 engines of 4 GPU\\(s\\) need 8 GPUs; 4 are given"):
        gpu_groups(two, EngineConfig(device="cuda", tp=4))
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU for 2 engines"):
        gpu_groups(two, EngineConfig(device="cuda:1"))
    assert engine_urls(two) == ["http://127.0.0.1:9000", "http://127.0.0.1:9001"]
    assert engine_urls(DPConfig(dp=1, engine_host="0.0.0.0")) == ["http://127.0.0.1:8100"]
    cmd = router_command(two, EngineConfig(api_key="s3cret", log_level="trace"))
    assert "s3cret" not in " ".join(cmd)
    args = cmd[cmd.index("--host") :]
    assert args[:6] == ["--host", "127.0.0.1", "--port", "8000", "--worker-urls", "http://127.0.0.1:9000"]
    assert args[args.index("--policy") : args.index("--policy") + 2] == ["--policy", "cache_aware"]
    assert args[-2:] == ["--log-level", "debug"]
    remote = DPConfig(dp=1, remote="http://10.0.0.2:8000/, http://10.0.0.3:8000")
    assert remote.remote_urls() == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    args = router_command(remote, EngineConfig())
    assert args[args.index("--worker-urls") + 1 :][:3] == ["http://127.0.0.1:8100", *remote.remote_urls()]
    assert DPConfig(dp=0, remote="http://b:1").remote_urls() == ["http://b:1"]
    bad_ones = (
        dict(dp=0),
        dict(dp=1, policy="power_of_two"),
        dict(health_check_interval=0),
        dict(remote="b:80"),
    )
    for bad in bad_ones:
        with pytest.raises(ValueError):
            DPConfig(**bad)


def test_serve_dp_help_needs_neither_torch_nor_setup(tmp_path):
    check = (
        "import sys\n"
        "from minisgl.cli import main\n"
        "try:\n    main(['serve-dp', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = {'torch', 'zmq', 'numpy', 'sglang_router'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: minisgl serve-dp") and "--health-failure-threshold" in done.stdout
    # scripts/serve-dp in a fresh clone whose setup would fail: help answers without it.
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "serve-dp", tmp_path / "scripts" / "serve-dp")
    (tmp_path / "scripts" / "setup").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "scripts" / "setup").chmod(0o755)
    shutil.copytree(REPO_ROOT / "worker_py" / "minisgl", tmp_path / "worker_py" / "minisgl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [tmp_path / "scripts" / "serve-dp", "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and "usage: minisgl serve-dp" in done.stdout, done.stderr


# --- two engines behind the router --------------------------------------------------------------------------
class Deployment:
    def __init__(self, model: Path, log: Path):
        self.router_port, engine_port = free_tcp_port(), two_free_ports()
        self.router = f"http://127.0.0.1:{self.router_port}"
        self.engines = [f"http://127.0.0.1:{engine_port + i}" for i in range(2)]
        cmd = [sys.executable, "-m", "minisgl", "serve-dp", str(model), "--dp", "2"]
        cmd += ["--router", f"127.0.0.1:{self.router_port}", "--engine-port", str(engine_port)]
        cmd += ["--router-metrics", f"127.0.0.1:{free_tcp_port()}"]
        cmd += [
            "--health-check-interval",
            str(HEALTH_INTERVAL_S),
            "--health-failure-threshold",
            str(HEALTH_FAILURES),
        ]
        # Round robin splits the burst evenly; cache_aware (the default) would send all eight prompts' copies
        # to the engine that saw each prompt first, possibly one engine for all.
        cmd += ["--policy", "round_robin"]
        cmd += ["--device", "cpu", "--dtype", "float32", "--num-pages", "512", "--max-batch", "64"]
        cmd += ["--max-seq-len", "2048", "--log-level", "warn"]
        self.log = log
        with log.open("w") as out:
            env = {**os.environ, "MINISGL_API_KEY": KEY}
            self.proc = subprocess.Popen(cmd, start_new_session=True, stderr=out, stdout=out, env=env)

    def wait_ready(self, within_s: float = 150) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"serve-dp exited with {self.proc.returncode}:\n{self.log.read_text()}"
            )
            try:
                status, state = call(self.router, "/readiness", key=None, timeout=2)
                if status == 200 and state["healthy_workers"] == 2:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the router did not see two engines:\n{self.log.read_text()}")

    def workers(self) -> dict[str, dict]:
        return {w["url"]: w for w in call(self.router, "/workers")[1]["workers"]}

    def served(self, engine: str) -> float:
        """Requests the engine has finished, from its metrics."""
        with urllib.request.urlopen(engine + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("minisgl_requests_total{")
        )

    def segments(self) -> list[str]:
        return glob.glob(f"/dev/shm/minisgl-{self.proc.pid}-*")


@pytest.fixture(scope="module")
def dp(model_dir, tmp_path_factory):
    d = Deployment(model_dir, tmp_path_factory.mktemp("dp") / "serve-dp.log")
    try:
        d.wait_ready()
        yield d
    finally:
        if d.proc.poll() is None:  # a test failed midway: nothing may outlive the module
            for pid in [*descendants(d.proc.pid), d.proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # each runs in a session of its own


def request(i: int) -> tuple[str, dict]:
    topic = TOPICS[i % len(TOPICS)]
    if i % 2:
        messages = [{"role": "user", "content": f"{topic.capitalize()}, in one sentence:"}]
        return "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0}
    # sglang-router's completions need a model name (any: one model is served).
    return "/v1/completions", {"model": "m", "prompt": f"# {topic}\ndef", "max_tokens": 8, "temperature": 0}


def text_of(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_64_concurrent_requests_through_the_router_match_each_alone(dp):
    alone = {}
    for i in range(len(TOPICS)):
        status, body = call(dp.router, *request(i))
        assert status == 200, body
        alone[i] = text_of(body)
    before = [dp.served(e) for e in dp.engines]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda i: call(dp.router, *request(i % len(TOPICS))), range(64)))
    for i, (status, body) in enumerate(together):
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        assert text_of(body) == alone[i % len(TOPICS)], f"request {i}"
    grown = [dp.served(e) - b for e, b in zip(dp.engines, before, strict=True)]
    assert sum(grown) == 64 and min(grown) > 0, f"each engine's share of the 64: {grown}"


def test_the_key_is_required_through_the_router_and_the_router_uses_it(dp):
    assert call(dp.router, *request(1), key=None)[0] == 401
    assert call(dp.router, *request(1), key="wrong")[0] == 401
    # The engines' /server_info needs the key too: the model name there is what the router read.
    assert {w["model_id"] for w in dp.workers().values()} == {"Qwen2.5-Coder-0.5B-Instruct"}
    status, info = call(dp.engines[0], "/server_info")
    assert status == 200 and info["dp_size"] == 1 and info["max_running_requests"] == 64
    assert call(dp.engines[0], "/server_info", key=None)[0] == 401
    status, load = call(dp.engines[1], "/get_load", key=None)
    assert status == 200 and load[0]["num_reqs"] == 0


def test_a_killed_engine_is_dropped_and_requests_keep_being_served(dp):
    victim, survivor = dp.engines
    pids = [
        p
        for p in descendants(dp.proc.pid)
        if f"--http 127.0.0.1:{victim.rsplit(':', 1)[1]}".encode()
        in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
    ]
    assert len(pids) == 1, "the victim's scheduler"
    assert len(dp.segments()) == 4, "two rings per engine"
    before = dp.served(survivor)
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    dropped, answered = None, 0
    while time.monotonic() - killed < 20:
        status, body = call(dp.router, *request(answered))
        assert status == 200, f"{time.monotonic() - killed:.1f} s after the kill: {body}"
        answered += 1
        if dropped is None and not dp.workers()[victim]["is_healthy"]:
            dropped = time.monotonic() - killed
        if dropped is not None and answered >= 4:
            break
    print(
        f"the router dropped the killed engine after {dropped:.2f} s; {answered} requests answered meanwhile"
    )
    assert dropped is not None and dropped < HEALTH_INTERVAL_S * (HEALTH_FAILURES + 2) + 2
    assert dp.served(survivor) - before == answered
    assert dp.proc.poll() is None, "one engine's death does not stop serve-dp"
    assert len(dp.segments()) == 2, "the dead engine's rings are removed"
    assert "engine 0 (" in dp.log.read_text() and "was killed by SIGKILL" in dp.log.read_text()


def test_ctrl_c_stops_everything_and_leaves_nothing(dp):
    processes = descendants(dp.proc.pid)
    assert len(processes) >= 3, "the router and the surviving engine's scheduler and worker"
    started = time.monotonic()
    dp.proc.send_signal(signal.SIGINT)
    assert dp.proc.wait(60) == 0, dp.log.read_text()
    print(f"serve-dp stopped {time.monotonic() - started:.2f} s after Ctrl-C")
    assert dp.segments() == []
    left = [p for p in processes if os.path.exists(f"/proc/{p}")]
    assert left == [], f"processes left: {left}"
