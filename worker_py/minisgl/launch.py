"""Starts the scheduler daemon and the worker (one process per tensor-parallel rank with --tp N), waits until
they serve, and supervises them.

Any process dying stops the others, and the launcher exits non-zero. The first Ctrl-C or SIGTERM drains:
the scheduler stops taking requests and finishes the live ones (up to --shutdown-timeout seconds), then every
process exits. A second one stops them at once. Either way nothing is left behind: no shared-memory segment,
no socket file.

    minisgl serve models/Qwen2.5-Coder-0.5B-Instruct
    python -m minisgl.launch --model models/Qwen2.5-Coder-0.5B-Instruct
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import ipaddress
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minisgl.flags import add_flags, env_opt, opt, to_argv
from minisgl.logs import LOG_FORMATS, setup_logging
from minisgl.worker.config import WorkerConfig

# Nothing heavier than the standard library at import: `minisgl serve --help` runs without the venv.

log = logging.getLogger("minisgl.launch")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"
# The same as minisgl.client.client.DEFAULT_ADDRESS, which imports zmq.
DEFAULT_LISTEN = "tcp://127.0.0.1:5557"
API_KEY_ENV = "MINISGL_API_KEY"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# After the scheduler's own drain deadline, how long the launcher still waits for it before stopping it.
DRAIN_SLACK_S = 10.0


@dataclass(frozen=True)
class SchedulingConfig:
    """How the scheduler admits requests. Each field is a flag of `minisgl serve` and, by the same name, of
    minisgl-sched, which gets them as they are (tests/test_launch.py checks that the defaults agree)."""

    prefix_cache: bool = opt(True, "reuse the KV pages of earlier prompts that start with the same tokens")
    schedule_policy: str = opt(
        "fcfs",
        "admission order: fcfs (arrival) or lpm (longest cached prefix first)",
        choices=("fcfs", "lpm"),
    )
    lpm_max_wait_steps: int = opt(
        1024, "with lpm: steps after which a waiting request goes first anyway", metavar="STEPS"
    )
    max_waiting: int = opt(
        4096,
        "requests (each of n samples) waiting for their first token; past it new ones are refused at once "
        "(HTTP 503 with Retry-After, ZeroMQ error overloaded)",
        metavar="N",
    )
    max_client_requests: int = opt(
        1024,
        "live requests of one ZeroMQ client; past it its new ones are refused (error too_many_requests)",
        metavar="N",
    )
    max_connections: int = opt(
        4096,
        "HTTP connections open at once; past it a new one gets a 503 (too_many_connections)",
        metavar="N",
    )


@dataclass(frozen=True)
class EngineConfig(SchedulingConfig, WorkerConfig):
    """How to run an engine: the worker's settings (`WorkerConfig`, passed to it as they are) and the
    scheduler's (`SchedulingConfig`, passed as they are, and the fields below). Every field is also a flag
    of `minisgl serve` (see `--help`)."""

    model: str = opt(
        str(DEFAULT_MODEL), "HF checkpoint directory, .gguf file or Hugging Face model id", metavar="MODEL"
    )
    listen: str = opt(
        DEFAULT_LISTEN,
        "ZeroMQ endpoint clients connect to; it has no authentication: keep it on loopback or an ipc:// path",
        metavar="ENDPOINT",
    )
    http: str = env_opt(
        "MINISGL_HTTP", "127.0.0.1:8000", "OpenAI-compatible HTTP API, or off", metavar="HOST:PORT"
    )
    api_key: str | None = env_opt(
        API_KEY_ENV,
        None,
        "bearer token the HTTP API requires; the variable keeps it out of `ps`",
        secret=True,
        metavar="KEY",
    )
    served_model_name: str | None = opt(
        None, "model name the HTTP API uses (default: the model dir's)", metavar="NAME"
    )
    max_seq_len: int | None = opt(None, "context length (default: the model's)", metavar="N")
    shutdown_timeout: float = opt(
        DEFAULT_SHUTDOWN_TIMEOUT_S,
        "after the first Ctrl-C or SIGTERM: how long live requests may still run",
        metavar="SECS",
    )
    sched_bin: str | None = opt(
        None, "the minisgl-sched binary (default: $MINISGL_SCHED, target/...)", metavar="PATH"
    )
    log_level: str = opt("info", "error, warn, info, debug or trace", metavar="LEVEL")
    log_format: str = opt(
        "text", "text, or json: one object per line, in all three processes", choices=LOG_FORMATS
    )
    ready_timeout_s: float = opt(900.0, "how long to wait for the engine to serve", metavar="SECS")

    def validate(self) -> None:
        super().validate()
        for name in ("max_waiting", "max_client_requests", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lpm_max_wait_steps < 0:
            raise ValueError(f"lpm_max_wait_steps must be 0 or more, got {self.lpm_max_wait_steps}")


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


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # `*`, an interface name, a host name: assume the network can reach it


def exposure_warnings(config: EngineConfig) -> list[str]:
    """What in `config` lets other machines in without a credential."""
    warnings = []
    if config.listen.startswith("tcp://") and not _is_loopback(config.listen[6:].rpartition(":")[0]):
        warnings.append(
            f"the ZeroMQ socket {config.listen} is reachable from the network and has no authentication: "
            "anyone who reaches it can run requests; keep --listen on loopback or an ipc:// path"
        )
    if config.http != "off" and not config.api_key and not _is_loopback(config.http.rpartition(":")[0]):
        warnings.append(
            f"the HTTP API on {config.http} is reachable from the network without an API key: "
            f"set ${API_KEY_ENV}"
        )
    return warnings


class EngineDied(RuntimeError):
    pass


class Engine:
    """The processes of a running engine: the scheduler and the worker, or with `tp` above 1 one worker
    process per rank (named `worker rank R`). Use as a context manager, or call start() and stop().

    `private_listen` replaces the config's `listen` with an ipc:// socket in the engine's own run directory,
    so that an engine nobody else needs to reach cannot collide with a server on the default address. `env`
    adds to (or replaces in) the environment every process of the engine gets: `minisgl serve-dp` gives each
    engine its GPUs through CUDA_VISIBLE_DEVICES."""

    def __init__(
        self, config: EngineConfig, *, private_listen: bool = False, env: dict[str, str] | None = None
    ):
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(env or {})
        self._deaths: list[str] = []
        self.run_dir = tempfile.mkdtemp(prefix="minisgl-")  # 0700: holds the control socket
        self.shm_prefix = f"minisgl-{os.getpid()}-{os.path.basename(self.run_dir)[8:]}"
        if private_listen:
            config = dataclasses.replace(config, listen=f"ipc://{self.run_dir}/requests.sock")
        self.config = config

    def _commands(self) -> dict[str, list[str]]:
        c = self.config
        control = f"ipc://{self.run_dir}/control.sock"
        sched = [find_scheduler(c.sched_bin), "--model", c.model, "--listen", c.listen, "--control", control]
        sched += ["--shm-prefix", self.shm_prefix, "--http", c.http, "--log-level", c.log_level]
        sched += ["--shutdown-timeout", f"{c.shutdown_timeout:g}", "--log-format", c.log_format]
        if not c.overlap:
            sched.append("--no-overlap")
        sched += to_argv(c, SchedulingConfig)
        for flag, value in (("--max-seq-len", c.max_seq_len), ("--served-model-name", c.served_model_name)):
            if value is not None:
                sched += [flag, str(value)]
        # The worker's flags are its config's fields, so every worker setting reaches it by the same name.
        worker = [sys.executable, "-m", "minisgl.worker", "--control", control, *to_argv(c, WorkerConfig)]
        worker += ["--log-level", c.log_level, "--log-format", c.log_format]
        if c.tp == 1:
            return {"scheduler": sched, "worker": worker}
        # The ranks meet in a file of the private run directory: one host, no port to pick or to collide on.
        dist = ["--dist-init", f"file://{self.run_dir}/dist-store"]
        ranks = {f"worker rank {r}": [*worker, "--tp-rank", str(r), *dist] for r in range(c.tp)}
        return {"scheduler": sched, **ranks}

    def _environments(self) -> dict[str, dict[str, str]]:
        # The key goes through the environment: on the command line every user of `ps` would read it. Only
        # the scheduler checks it, so the worker does not get it at all.
        worker = {k: v for k, v in {**os.environ, **self.env}.items() if k != API_KEY_ENV}
        sched = dict(worker)
        if self.config.api_key:
            sched[API_KEY_ENV] = self.config.api_key
        return {"scheduler": sched, "worker": worker}

    def start(self) -> Engine:
        self._resolve_model()
        if self.config.tp > 1:
            from minisgl.tp import check_model

            check_model(self.config.model, self.config.tp)  # at once, not after every rank loaded weights
        envs = self._environments()
        for name, cmd in self._commands().items():
            log.debug("starting %s: %s", name, " ".join(cmd))
            # A process group of its own, so a stop reaches whatever the child started too, and so a Ctrl-C in
            # the terminal reaches only the launcher, which decides what each process gets.
            env = envs["scheduler" if name == "scheduler" else "worker"]
            self.procs[name] = subprocess.Popen(cmd, start_new_session=True, env=env)
        return self

    def _resolve_model(self) -> None:
        """A GGUF file or a hub id becomes a checkpoint directory (converted or fetched first if need be),
        served under the name the user gave it rather than the directory's."""
        from minisgl.checkpoint.sources import resolve_model

        c = self.config
        if Path(c.model).expanduser().is_dir():
            return
        directory = resolve_model(c.model)
        name = c.served_model_name or (Path(c.model).stem if c.model.endswith(".gguf") else c.model)
        log.info("serving %s from %s", c.model, directory)
        self.config = dataclasses.replace(c, model=str(directory), served_model_name=name)

    def dead(self) -> str | None:
        """The name of the first process seen to have exited, if any. Of several seen at once, one killed by
        a signal goes first, then a worker rank: the others follow such a death (the scheduler exits when a
        rank is gone, a rank fails when its peer does), so it is what went wrong."""
        if not self._deaths:
            exited = [(name, p.returncode) for name, p in self.procs.items() if p.poll() is not None]
            exited.sort(key=lambda e: (e[1] >= 0, e[0] == "scheduler"))
            self._deaths = [name for name, _ in exited]
        return self._deaths[0] if self._deaths else None

    def death(self, name: str) -> str:
        """What the exit of process `name` says, in words."""
        code = self.procs[name].returncode
        how = f"exited with code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how = f"was killed by {signal.Signals(-code).name}"
        return f"the {name} (pid {self.procs[name].pid}) {how}"

    def wait_ready(self, cancelled: Callable[[], bool] = lambda: False) -> dict | None:
        """Blocks until the scheduler answers `info` (and returns it), or `cancelled()` (and returns None);
        raises EngineDied if a process exits first."""
        from minisgl.client.client import Client

        deadline = time.monotonic() + self.config.ready_timeout_s
        with Client(self.config.listen) as client:
            client.send({"type": "info"})
            while time.monotonic() < deadline:
                if cancelled():
                    return None
                if (name := self.dead()) is not None:
                    raise EngineDied(f"{self.death(name)} before the engine was ready")
                try:
                    return client.next_reply(None, timeout_s=0.5)
                except TimeoutError:
                    continue
        raise TimeoutError(f"the engine was not ready within {self.config.ready_timeout_s} s")

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops the scheduler first: it tells the worker to exit through the ring (and a worker whose
        scheduler is gone exits by itself), so all end cleanly. A scheduler still there after `grace_s` gets
        a second SIGTERM, which ends a drain at once; then, like the worker, SIGKILL. The worker's ranks
        share their waits (a rank blocked in a collective with a dead one needs its signal), so stopping
        takes no longer with more of them."""
        scheduler = self.procs.get("scheduler")
        if scheduler is not None:
            if scheduler.poll() is None:
                _signal_group(scheduler, signal.SIGTERM)
            _wait_or_signal({"scheduler": scheduler}, grace_s)
        _wait_or_signal({n: p for n, p in self.procs.items() if n != "scheduler"}, grace_s)
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


def _wait_or_signal(procs: dict[str, subprocess.Popen], grace_s: float) -> None:
    """Waits up to `grace_s` for all of `procs` to exit, sends those left SIGTERM, waits as long again, then
    sends SIGKILL and waits for them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        procs = {name: p for name, p in procs.items() if p.poll() is None}
        for name, proc in procs.items():
            log.warning("the %s did not stop within %.0f s: sending %s", name, grace_s, sig.name)
            _signal_group(proc, sig)
    for proc in procs.values():
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


SIGNALS_HELP = """\
signals:
  The first Ctrl-C or SIGTERM drains: the engine refuses new requests (HTTP 503, ZeroMQ error code
  shutting_down), lets the live ones finish for up to --shutdown-timeout seconds, then exits 0.
  A second Ctrl-C or SIGTERM stops it at once.
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    """One flag per EngineConfig field (`--max-batch 64`); a field that is on by default has `--no-...`."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=SIGNALS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        metavar="MODEL",
        help="an HF checkpoint directory, a .gguf file (converted once) or a Hugging Face model id (from the "
        "local hub cache; fetched when the machine may reach the hub) (or --model)",
    )
    add_flags(p, EngineConfig)
    # --model's default is filled in after parsing, so that MODEL and --model cannot both be given.
    p.set_defaults(model=None)
    return p


def parse_args(argv: list[str] | None = None, prog: str = "python -m minisgl.launch") -> EngineConfig:
    p = build_parser(prog)
    args = vars(p.parse_args(argv))
    model_dir = args.pop("model_dir")
    if model_dir is not None and args["model"] is not None:
        p.error("give the model once: as MODEL or as --model")
    args["model"] = model_dir or args["model"] or str(DEFAULT_MODEL)
    return EngineConfig(**args)


def _drain(engine: Engine, signals: list[int]) -> int:
    """After the first signal: the scheduler drains and exits by itself, telling the worker to exit."""
    timeout = engine.config.shutdown_timeout
    log.info("draining: up to %g s for live requests (Ctrl-C again to stop at once)", timeout)
    scheduler = engine.procs["scheduler"]
    _signal_group(scheduler, signal.SIGTERM)
    deadline = time.monotonic() + timeout + DRAIN_SLACK_S
    while scheduler.poll() is None:
        if len(signals) > 1:
            log.info("stopping at once")
            _signal_group(scheduler, signal.SIGTERM)
            return 0
        if time.monotonic() > deadline:
            log.error("the scheduler was still draining %g s after its deadline: stopping it", DRAIN_SLACK_S)
            return 1
        time.sleep(0.1)
    if scheduler.returncode != 0:
        log.error("the scheduler exited with code %s while draining", scheduler.returncode)
        return 1
    log.info("drained")
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m minisgl.launch") -> int:
    config = parse_args(argv, prog)
    from minisgl.checkpoint.gguf import CheckpointError
    from minisgl.checkpoint.sources import ModelNotFound
    from minisgl.tp import CannotSplit

    setup_logging(config.log_level, config.log_format)
    for warning in exposure_warnings(config):
        log.warning("%s", warning)
    engine = Engine(config)
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine.start()
        # A signal during the start drains too: the scheduler may be serving already (clients can get its
        # `info` before we do), and one that is still starting has nothing to drain and exits at once.
        info = engine.wait_ready(cancelled=lambda: bool(signals))
        if info is not None:
            http = "" if config.http == "off" else f" and http://{config.http}/v1"
            model = Path(info.get("model", config.model)).name
            log.info("serving %s on %s%s (%s)", model, config.listen, http, info)
        while not signals:
            if (name := engine.dead()) is not None:
                log.error("%s; stopping the engine", engine.death(name))
                return 1
            time.sleep(0.2)
        return _drain(engine, signals)
    except (EngineDied, TimeoutError, FileNotFoundError, ModelNotFound, CheckpointError, CannotSplit) as e:
        log.error("%s", e)
        return 1
    finally:
        engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
