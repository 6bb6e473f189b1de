"""Starts the scheduler daemon and the worker, waits until they serve, and supervises them.

Either process dying stops the other, and the launcher exits non-zero. Ctrl-C or SIGTERM stops both (SIGTERM,
then SIGKILL after a grace period) and removes what they left behind: shared-memory segments and socket files.

    python -m minisgl.launch --model models/Qwen2.5-Coder-0.5B-Instruct
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from minisgl.client.client import DEFAULT_ADDRESS, Client
from minisgl.logs import setup_logging

log = logging.getLogger("minisgl.launch")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


def _env_opt(var: str, default: str, help: str):
    """A default that $var replaces, read when a config is made (not at import), so that a test suite can set
    it for every engine it starts, in process or not."""
    return field(default_factory=lambda: os.environ.get(var, default), metadata={"help": f"{help} (${var})"})


@dataclass(frozen=True)
class EngineConfig:
    """How to run an engine. Every field is also a flag of `python -m minisgl.launch` (see `--help`)."""

    model: str = _opt(str(DEFAULT_MODEL), "HF checkpoint directory to serve")
    listen: str = _opt(DEFAULT_ADDRESS, "ZeroMQ endpoint clients connect to (loopback by default)")
    http: str = _env_opt("MINISGL_HTTP", "127.0.0.1:8000", "OpenAI-compatible HTTP API host:port, or off")
    served_model_name: str | None = _opt(None, "model name the HTTP API uses (default: the model dir's)")
    device: str = _opt("auto", "auto (cuda when torch sees a GPU), cpu, cuda, cuda:N")
    dtype: str = _opt("auto", "auto (bfloat16 on cuda, float32 on cpu, where bf16 is slow), or a dtype")
    attention: str = _opt("auto", "auto (flashinfer on cuda when installed, else torch), torch, flashinfer")
    num_pages: int | None = _opt(None, "KV pages (default: from memory; 1 GiB of KV on the CPU)")
    page_size: int = _opt(16, "tokens per KV page")
    max_batch: int | None = _opt(None, "most requests per step (default: 256 on cuda, 64 on cpu)")
    max_step_tokens: int | None = _opt(None, "most new tokens per step; longer prompts are chunked")
    max_seq_len: int | None = _opt(None, "context length (default: the model's)")
    kv_fraction: float = _opt(0.85, "on cuda: share of the memory left after the weights for the KV cache")
    decode_attention: str = _opt(
        "triton", "the flashinfer backend's decode kernel: triton (ours) or flashinfer"
    )
    cuda_graphs: bool = _opt(True, "decode steps replay captured CUDA graphs")
    fused_kernels: bool = _opt(
        True, "Triton kernels: norms, RoPE with the KV write, SiLU-and-mul, small-batch projections"
    )
    overlap: bool = _opt(True, "the scheduler plans step N+1 while the worker runs step N")
    sched_bin: str | None = _opt(None, "the minisgl-sched binary (default: $MINISGL_SCHED, target/...)")
    log_level: str = _opt("info", "error, warn, info, debug or trace")
    ready_timeout_s: float = _opt(900.0, "how long to wait for the engine to serve")


def find_scheduler(explicit: str | None = None) -> str:
    for candidate in (
        explicit,
        os.environ.get("MINISGL_SCHED"),
        str(REPO_ROOT / "target" / "release" / "minisgl-sched"),
        str(REPO_ROOT / "target" / "debug" / "minisgl-sched"),
        shutil.which("minisgl-sched"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "minisgl-sched not found: build it with `cargo build --release` or set MINISGL_SCHED"
    )


class EngineDied(RuntimeError):
    pass


class Engine:
    """The two processes of a running engine. Use as a context manager, or call start() and stop()."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.run_dir = tempfile.mkdtemp(prefix="minisgl-")  # 0700: holds the control socket
        self.shm_prefix = f"minisgl-{os.getpid()}-{os.path.basename(self.run_dir)[8:]}"

    def _commands(self) -> dict[str, list[str]]:
        c = self.config
        control = f"ipc://{self.run_dir}/control.sock"
        sched = [find_scheduler(c.sched_bin), "--model", c.model, "--listen", c.listen, "--control", control]
        sched += ["--shm-prefix", self.shm_prefix, "--log-level", c.log_level, "--http", c.http]
        worker = [sys.executable, "-m", "minisgl.worker", "--model", c.model, "--control", control]
        worker += ["--device", c.device, "--dtype", c.dtype, "--attention", c.attention]
        worker += ["--decode-attention", c.decode_attention]
        worker += [
            "--page-size",
            str(c.page_size),
            "--kv-fraction",
            str(c.kv_fraction),
            "--log-level",
            c.log_level,
        ]
        for on, flag, to in (
            (c.cuda_graphs, "--no-cuda-graphs", [worker]),
            (c.fused_kernels, "--no-fused-kernels", [worker]),
            (c.overlap, "--no-overlap", [worker, sched]),
        ):
            for cmd in to if not on else ():
                cmd.append(flag)
        for flag, value, to in (
            ("--num-pages", c.num_pages, worker),
            ("--max-batch", c.max_batch, worker),
            ("--max-tokens", c.max_step_tokens, worker),
            ("--max-seq-len", c.max_seq_len, sched),
            ("--served-model-name", c.served_model_name, sched),
        ):
            if value is not None:
                to += [flag, str(value)]
        return {"scheduler": sched, "worker": worker}

    def start(self) -> Engine:
        for name, cmd in self._commands().items():
            log.debug("starting %s: %s", name, " ".join(cmd))
            # A process group of its own, so a stop reaches whatever the child started too.
            self.procs[name] = subprocess.Popen(cmd, start_new_session=True)
        return self

    def dead(self) -> str | None:
        """The name of a process that has exited, if any."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name
        return None

    def wait_ready(self) -> dict:
        """Blocks until the scheduler answers `info`; raises EngineDied if a process exits first."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        with Client(self.config.listen) as client:
            client.send({"type": "info"})
            while time.monotonic() < deadline:
                if (name := self.dead()) is not None:
                    code = self.procs[name].returncode
                    raise EngineDied(f"the {name} exited with code {code} before the engine was ready")
                try:
                    return client.next_reply(None, timeout_s=0.5)
                except TimeoutError:
                    continue
        raise TimeoutError(f"the engine was not ready within {self.config.ready_timeout_s} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops the scheduler first: it tells the worker to exit through the ring (and a worker whose
        scheduler is gone exits by itself), so both end cleanly. A process still there after `grace_s` gets
        SIGTERM, then SIGKILL."""
        for name in ("scheduler", "worker"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if name == "scheduler" and proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(grace_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("the %s did not stop within %.0f s: sending %s", name, grace_s, sig.name)
                    _signal_group(proc, sig)
            proc.wait()
        self.cleanup()

    def cleanup(self) -> None:
        """Removes what a killed process could not: its shared-memory segments and the socket directory."""
        for path in glob.glob(f"/dev/shm/{self.shm_prefix}-*"):
            os.unlink(path)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.config.listen.startswith("ipc://"):
            Path(self.config.listen[len("ipc://") :]).unlink(missing_ok=True)

    def __enter__(self) -> Engine:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    """One flag per EngineConfig field (`--max-batch 64`); a field that is on by default has `--no-...`."""
    p = argparse.ArgumentParser(prog="minisgl", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(EngineConfig):
        flag, help = f.name.replace("_", "-"), f.metadata["help"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            p.add_argument(f"--no-{flag}", dest=f.name, action="store_false", help=f"off: {help}")
            continue
        kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
        p.add_argument(f"--{flag}", type=kind, default=default, help=f"{help} [{default}]")
    return EngineConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level)
    engine = Engine(config)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        engine.start()
        info = engine.wait_ready()
        http = "" if config.http == "off" else f" and http://{config.http}/v1"
        model = Path(info.get("model", config.model)).name
        log.info("serving %s on %s%s (%s)", model, config.listen, http, info)
        while not stopping:
            if (name := engine.dead()) is not None:
                code = engine.procs[name].returncode
                log.error("the %s exited with code %s; stopping the engine", name, code)
                return 1
            time.sleep(0.2)
        log.info("stopping")
        return 0
    except (EngineDied, TimeoutError) as e:
        log.error("%s", e)
        return 1
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
