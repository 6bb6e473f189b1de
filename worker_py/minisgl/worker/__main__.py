"""The worker process: `python -m minisgl.worker --model DIR --control ipc://...` (the launcher runs it)."""

from __future__ import annotations

import argparse
import sys

from minisgl.flags import add_flags, from_flags
from minisgl.logs import LOG_FORMATS, setup_logging
from minisgl.worker.config import WorkerConfig


def parse_args(argv: list[str] | None = None) -> tuple[WorkerConfig, str]:
    p = argparse.ArgumentParser(prog="python -m minisgl.worker", description=__doc__)
    p.add_argument("--control", required=True, help="the scheduler's handshake socket (ipc://...)")
    add_flags(p, WorkerConfig)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="json: one object per line")
    a = vars(p.parse_args(argv))
    if not a["model"]:
        p.error("--model is required")
    setup_logging(a["log_level"], a["log_format"])
    return from_flags(WorkerConfig, a), a["control"]


def main(argv: list[str] | None = None) -> int:
    config, control = parse_args(argv)
    from minisgl.worker.loop import serve  # torch loads here, after the flags are checked

    return serve(config, control)


if __name__ == "__main__":
    sys.exit(main())
