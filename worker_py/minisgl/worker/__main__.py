"""The worker process: `python -m minisgl.worker --model DIR --control ipc://...` (the launcher runs it)."""

from __future__ import annotations

import argparse
import sys

from minisgl.flags import add_flags, from_flags
from minisgl.logs import LOG_FORMATS, setup_logging
from minisgl.worker.config import WorkerConfig


def parse_args(argv: list[str] | None = None) -> tuple[WorkerConfig, str]:
    config, control, _rank, _init = _parse(argv)
    return config, control


def _parse(argv: list[str] | None) -> tuple[WorkerConfig, str, int, str | None]:
    p = argparse.ArgumentParser(prog="python -m minisgl.worker", description=__doc__)
    p.add_argument("--control", required=True, help="the scheduler's handshake socket (ipc://...)")
    p.add_argument("--tp-rank", type=int, default=0, help="with --tp N: which rank this is, 0 .. N-1")
    p.add_argument(
        "--dist-init", default=None, help="with --tp N: the ranks' torch.distributed rendezvous (file://...)"
    )
    add_flags(p, WorkerConfig)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="json: one object per line")
    a = vars(p.parse_args(argv))
    if not a["model"]:
        p.error("--model is required")
    config = from_flags(WorkerConfig, a)
    if not 0 <= a["tp_rank"] < config.tp:
        p.error(f"--tp-rank {a['tp_rank']} is not a rank of --tp {config.tp}")
    setup_logging(a["log_level"], a["log_format"])
    return config, a["control"], a["tp_rank"], a["dist_init"]


def main(argv: list[str] | None = None) -> int:
    config, control, tp_rank, dist_init = _parse(argv)
    from minisgl.worker.loop import serve  # torch loads here, after the flags are checked

    return serve(config, control, tp_rank, dist_init)


if __name__ == "__main__":
    sys.exit(main())
