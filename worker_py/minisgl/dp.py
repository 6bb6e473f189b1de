"""Data parallelism on one host: N engines, each a whole `minisgl serve` (a scheduler and its worker, or its
--tp ranks) with its own HTTP port and run directory, behind sglang-router, which clients talk to.

    minisgl serve-dp --dp 2        # the router on http://127.0.0.1:8000/v1, engines on 8100 and 8101
    minisgl serve-dp --dp 4 --tp 2 --gpus 0,1,2,3,4,5,6,7

On GPUs engine i gets GPUs i*tp .. i*tp+tp-1 of --gpus (default: CUDA_VISIBLE_DEVICES, else every GPU),
through its own CUDA_VISIBLE_DEVICES. On the CPU the engines share the cores.

An engine that dies is logged and left to the router, whose health checks stop sending to it (--health-check-
interval, --health-failure-threshold); the others keep serving. The router dying stops everything (exit 1),
as does the last engine dying. The first Ctrl-C or SIGTERM drains every engine (live requests finish, new
ones are refused), then stops the router; a second stops everything at once. Nothing is left behind: no
process, no shared-memory segment. docs/scale-out.md has the details, and how to run engines on several hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from minisgl.flags import add_flags, from_flags, opt
from minisgl.launch import (
    API_KEY_ENV,
    DEFAULT_MODEL,
    DRAIN_SLACK_S,
    Engine,
    EngineConfig,
    EngineDied,
    _is_loopback,
    _signal_group,
    _wait_or_signal,
)
from minisgl.logs import setup_logging

log = logging.getLogger("minisgl.dp")

ROUTER_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two")
# How long the router may take to see every engine healthy once they all serve.
ROUTER_READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DPConfig:
    """The data-parallel settings of `minisgl serve-dp`; each field is a flag. Every engine gets the same
    `minisgl serve` flags (all of them but --listen and --http, which serve-dp chooses per engine)."""

    dp: int = opt(2, "engines: whole replicas of the model, each with its own KV cache", metavar="N")
    router: str = opt(
        "127.0.0.1:8000",
        "the router's address: the OpenAI-compatible API that clients use",
        metavar="HOST:PORT",
    )
    engine_host: str = opt(
        "127.0.0.1",
        "the address each engine's own HTTP API binds (loopback: only this host's router reaches them)",
        metavar="HOST",
    )
    engine_port: int = opt(8100, "engine i serves its HTTP API on this port + i", metavar="PORT")
    policy: str = opt(
        "cache_aware",
        "how the router picks an engine: cache_aware (the engine that saw the longest prefix of the prompt, "
        "unless the load is too uneven), round_robin, random or power_of_two (the less loaded of two)",
        choices=ROUTER_POLICIES,
    )
    gpus: str | None = opt(
        None,
        "GPUs to spread the engines over, comma-separated (default: CUDA_VISIBLE_DEVICES, else every GPU "
        "torch sees); engine i takes the i-th group of --tp",
        metavar="IDS",
    )
    router_metrics: str = opt("127.0.0.1:29000", "the router's own Prometheus endpoint", metavar="HOST:PORT")
    health_check_interval: int = opt(
        2, "seconds between the router's health checks of each engine", metavar="SECS"
    )
    health_failure_threshold: int = opt(
        2,
        "failed health checks in a row after which the router stops sending to an engine",
        metavar="N",
    )
    remote: str | None = opt(
        None,
        "engines on other hosts that the router sends to as well, comma-separated URLs (http://HOST:PORT of "
        "a `minisgl serve --http 0.0.0.0:PORT` there); serve-dp neither starts nor watches them",
        metavar="URLS",
    )
    router_args: str = opt(
        "",
        "more sglang-router flags, as one string: --router-args '--retry-max-retries 3'",
        metavar="ARGS",
    )

    def validate(self) -> None:
        if self.dp < 0 or (self.dp == 0 and not self.remote_urls()):
            raise ValueError(f"--dp must be at least 1 (or 0 with --remote engines), got {self.dp}")
        for url in self.remote_urls():
            if not url.startswith(("http://", "https://")) or url.count(":") < 2:
                raise ValueError(f"--remote takes http://HOST:PORT URLs, got {url!r}")
        for name in ("health_check_interval", "health_failure_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.engine_port <= 65535 - (self.dp - 1):
            raise ValueError(f"--engine-port {self.engine_port} leaves no room for {self.dp} ports")
        if self.policy == "power_of_two" and self.dp + len(self.remote_urls()) < 2:
            raise ValueError("--policy power_of_two needs at least two engines")

    def remote_urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.remote or "").split(",") if u.strip()]

    def __post_init__(self) -> None:
        self.validate()


def _host_port(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{flag} must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def engine_urls(dp: DPConfig) -> list[str]:
    """Where the router reaches each engine. An engine bound to every interface is reached on loopback."""
    host = (
        "127.0.0.1"
        if dp.engine_host in ("0.0.0.0", "")
        else "::1"
        if dp.engine_host == "::"
        else dp.engine_host
    )
    return [f"http://{_url_host(host)}:{dp.engine_port + i}" for i in range(dp.dp)]


def gpu_groups(dp: DPConfig, config: EngineConfig) -> list[str] | None:
    """Each engine's CUDA_VISIBLE_DEVICES, or None to run them as the config says (the CPU, or one engine
    on whatever it sees)."""
    if config.device == "cpu":
        return None
    if config.device.startswith("cuda:") and dp.dp > 1:
        raise ValueError(
            f"--device {config.device} names one GPU for {dp.dp} engines: give --device cuda (or auto) and "
            "choose the GPUs with --gpus"
        )
    if dp.gpus is not None:
        gpus = [g.strip() for g in dp.gpus.split(",") if g.strip()]
    elif os.environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        if config.device == "auto":
            return None  # no GPU: the engines run on the CPU
        raise ValueError(f"--device {config.device}: no GPU to give the engines")
    need = dp.dp * config.tp
    if len(gpus) < need:
        raise ValueError(
            f"{dp.dp} engines of {config.tp} GPU(s) need {need} GPUs; {len(gpus)} are given: {','.join(gpus)}"
        )
    return [",".join(gpus[i * config.tp : (i + 1) * config.tp]) for i in range(dp.dp)]


def engine_environments(dp: DPConfig, config: EngineConfig) -> list[dict[str, str]]:
    if not dp.dp:
        return []
    groups = gpu_groups(dp, config)
    if groups is not None:
        return [{"CUDA_VISIBLE_DEVICES": g} for g in groups]
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(dp.dp)]
    # CPU engines share the cores rather than each taking all of them (which slows every one down).
    threads = max(1, (os.cpu_count() or 1) // (dp.dp * config.tp))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(dp.dp)]


def router_command(dp: DPConfig, config: EngineConfig) -> list[str]:
    host, port = _host_port(dp.router, "--router")
    metrics_host, metrics_port = _host_port(dp.router_metrics, "--router-metrics")
    level = {"trace": "debug", "warning": "warn"}.get(config.log_level, config.log_level)
    args = ["--host", host, "--port", str(port), "--worker-urls", *engine_urls(dp), *dp.remote_urls()]
    args += ["--policy", dp.policy, "--prometheus-host", metrics_host, "--prometheus-port", str(metrics_port)]
    args += ["--health-check-interval-secs", str(dp.health_check_interval)]
    args += ["--health-failure-threshold", str(dp.health_failure_threshold)]
    if level in ("debug", "info", "warn", "error"):
        args += ["--log-level", level]
    args += shlex.split(dp.router_args)
    # The key reaches the router through its environment (run_router), never its command line.
    run = "import sys; from minisgl.dp import run_router; sys.exit(run_router(sys.argv[1:]))"
    return [sys.executable, "-c", run, *args]


def run_router(argv: list[str]) -> int:
    """The router's process: sglang-router's own launcher, with $MINISGL_API_KEY as its --api-key, which it
    then requires of clients and sends to the engines."""
    from sglang_router.launch_router import launch_router, parse_router_args

    key = os.environ.pop(API_KEY_ENV, None)
    launch_router(parse_router_args([*argv, "--api-key", key] if key else argv))
    return 0


class Router:
    def __init__(self, dp: DPConfig, config: EngineConfig):
        self.dp, self.config = dp, config
        self.proc: subprocess.Popen | None = None
        host, port = _host_port(dp.router, "--router")
        self.url = f"http://{_url_host('127.0.0.1' if host in ('0.0.0.0', '') else host)}:{port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key
        cmd = router_command(self.dp, self.config)
        log.debug("starting the router: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, start_new_session=True, env=env)

    def readiness(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"{self.url}/readiness", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            with contextlib.suppress(ValueError):
                return json.loads(e.read())
        except (OSError, ValueError):
            pass
        return None

    def wait_ready(self, engines: int, needed: int, cancelled) -> bool:
        """Until the router counts `engines` healthy engines (True), or `cancelled()` (False). Past the
        timeout, `needed` of them will do (remote engines may come later: the router keeps trying them)."""
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT_S
        healthy = 0
        while time.monotonic() < deadline:
            if cancelled():
                return False
            if self.proc.poll() is not None:
                raise EngineDied(f"the router exited with code {self.proc.returncode} before it was ready")
            healthy = (self.readiness() or {}).get("healthy_workers", 0)
            if healthy >= engines:
                return True
            time.sleep(0.2)
        if healthy >= needed:
            log.warning(
                "the router sees %d of %d engines healthy: it keeps trying the others", healthy, engines
            )
            return True
        raise TimeoutError(
            f"the router did not see {needed} healthy engines within {ROUTER_READY_TIMEOUT_S:g} s"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
        _wait_or_signal({"router": self.proc}, grace_s)


def resolve_model(config: EngineConfig) -> EngineConfig:
    """A GGUF file or a hub id becomes a checkpoint directory once, before N engines would each convert it."""
    from minisgl.checkpoint.sources import resolve_model as resolve

    if Path(config.model).expanduser().is_dir():
        return config
    directory = resolve(config.model)
    name = config.served_model_name or (
        Path(config.model).stem if config.model.endswith(".gguf") else config.model
    )
    return dataclasses.replace(config, model=str(directory), served_model_name=name)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir", nargs="?", metavar="MODEL", help="as for `minisgl serve` (or --model)")
    group = p.add_argument_group("data parallelism")
    add_flags(group, DPConfig)
    group = p.add_argument_group("every engine (the flags of `minisgl serve`)")
    add_flags(group, EngineConfig, skip=("listen", "http"))
    p.set_defaults(model=None)
    return p


def parse_args(argv: list[str] | None, prog: str) -> tuple[DPConfig, EngineConfig]:
    p = build_parser(prog)
    args = vars(p.parse_args(argv))
    model_dir = args.pop("model_dir")
    if model_dir is not None and args["model"] is not None:
        p.error("give the model once: as MODEL or as --model")
    args["model"] = model_dir or args["model"] or str(DEFAULT_MODEL)
    try:
        return from_flags(DPConfig, args), from_flags(EngineConfig, args)
    except ValueError as e:
        p.error(str(e))


class DataParallel:
    """The engines and the router, started and stopped together."""

    def __init__(self, dp: DPConfig, config: EngineConfig):
        self.dp, self.config = dp, config
        self.urls = engine_urls(dp)
        host = _url_host(dp.engine_host)
        self.engines = [
            Engine(
                dataclasses.replace(config, http=f"{host}:{dp.engine_port + i}"), private_listen=True, env=env
            )
            for i, env in enumerate(engine_environments(dp, config))
        ]
        self.router = Router(dp, config)
        self.gone: set[int] = set()

    def start(self, cancelled) -> bool:
        """Starts every engine, waits until all serve, then starts the router and waits until it sees them
        all. False if `cancelled()` first."""
        for engine in self.engines:
            engine.start()
        for i, engine in enumerate(self.engines):
            try:
                if engine.wait_ready(cancelled) is None:
                    return False
            except EngineDied as e:
                raise EngineDied(f"engine {i} ({self.urls[i]}): {e}") from None
            log.info("engine %d serves on %s", i, self.urls[i])
        self.router.start()
        total = len(self.engines) + len(self.dp.remote_urls())
        return self.router.wait_ready(total, max(1, len(self.engines)), cancelled)

    def check(self) -> str | None:
        """Logs each engine that died since the last call (and stops what is left of it); returns why
        everything must stop, if it must."""
        for i, engine in enumerate(self.engines):
            if i in self.gone or (name := engine.dead()) is None:
                continue
            self.gone.add(i)
            left = len(self.engines) - len(self.gone)
            # A scheduler that exits 0 was drained (a SIGTERM of its own): an operator's act, not a fault.
            drained = name == "scheduler" and engine.procs[name].returncode == 0
            log.log(
                logging.WARNING if drained else logging.ERROR,
                "engine %d (%s): %s; the router stops sending to it after %d failed health checks; "
                "%d engine(s) left",
                i,
                self.urls[i],
                engine.death(name),
                self.dp.health_failure_threshold,
                left,
            )
            engine.stop()
        if self.router.proc.poll() is not None:
            return f"the router (pid {self.router.proc.pid}) exited with code {self.router.proc.returncode}"
        if self.engines and len(self.gone) == len(self.engines) and not self.dp.remote_urls():
            return "every engine is gone"
        return None

    def drain(self, signals: list[int]) -> int:
        """After the first signal: every engine drains at once (the router, seeing them draining, has nowhere
        to send new requests); then the router stops."""
        timeout = self.config.shutdown_timeout
        log.info(
            "draining %d engine(s): up to %g s for live requests (Ctrl-C again to stop at once)",
            len(self.engines),
            timeout,
        )
        live = [e for i, e in enumerate(self.engines) if i not in self.gone]
        for engine in live:
            _signal_group(engine.procs["scheduler"], signal.SIGTERM)
        deadline = time.monotonic() + timeout + DRAIN_SLACK_S
        while any(e.procs["scheduler"].poll() is None for e in live):
            if len(signals) > 1:
                log.info("stopping at once")
                for engine in live:
                    _signal_group(engine.procs["scheduler"], signal.SIGTERM)
                return 0
            if time.monotonic() > deadline:
                log.error("an engine was still draining %g s after its deadline: stopping it", DRAIN_SLACK_S)
                return 1
            time.sleep(0.1)
        failed = [i for i, e in enumerate(self.engines) if e in live and e.procs["scheduler"].returncode != 0]
        if failed:
            log.error("engine(s) %s exited non-zero while draining", ", ".join(map(str, failed)))
            return 1
        log.info("drained")
        return 0

    def stop(self) -> None:
        """Everything, engines first (a request the router holds ends with its engine's answer)."""
        for engine in self.engines:
            engine.stop()
        self.router.stop()


def main(argv: list[str] | None = None, prog: str = "minisgl serve-dp") -> int:
    dp, config = parse_args(argv, prog)
    setup_logging(config.log_level, config.log_format)
    from minisgl.checkpoint.gguf import CheckpointError
    from minisgl.checkpoint.sources import ModelNotFound
    from minisgl.tp import CannotSplit

    try:
        import sglang_router  # noqa: F401
    except ModuleNotFoundError:
        log.error("serve-dp needs sglang-router: pip install -r worker_py/requirements.lock (scripts/setup)")
        return 1
    router_host, _ = _host_port(dp.router, "--router")
    if not config.api_key:
        for what, host in (("the router", router_host), ("the engines", dp.engine_host)):
            if not _is_loopback(host):
                log.warning(
                    "%s on %s can be reached from the network without an API key: set $%s",
                    what,
                    host,
                    API_KEY_ENV,
                )
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    group = None
    try:
        if dp.dp:
            config = resolve_model(config)
        if dp.dp and config.tp > 1:
            from minisgl.tp import check_model

            check_model(config.model, config.tp)
        group = DataParallel(dp, config)
        if group.start(cancelled=lambda: bool(signals)):
            log.info(
                "serving %s on %s/v1 through %d engine(s): %s",
                Path(config.model).name,
                group.router.url,
                dp.dp + len(dp.remote_urls()),
                ", ".join(group.urls + dp.remote_urls()),
            )
        while not signals:
            if (why := group.check()) is not None:
                log.error("%s: stopping", why)
                return 1
            time.sleep(0.2)
        return group.drain(signals)
    except (
        EngineDied,
        TimeoutError,
        FileNotFoundError,
        ModelNotFound,
        CheckpointError,
        CannotSplit,
        ValueError,
    ) as e:
        log.error("%s", e)
        return 1
    finally:
        if group is not None:
            group.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
