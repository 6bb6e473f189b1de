"""`minisgl`: one command for serving, talking to and measuring an engine.

Each subcommand imports what it needs only when it runs, so that `minisgl serve --help` answers at once, even
without the venv's packages installed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = "usage: minisgl COMMAND [ARGS...]"


def _serve(argv: list[str]) -> int:
    from minisgl import launch

    return launch.main(argv, prog="minisgl serve")


def _serve_dp(argv: list[str]) -> int:
    from minisgl import dp

    return dp.main(argv, prog="minisgl serve-dp")


def _chat(argv: list[str]) -> int:
    from minisgl.cli import chat

    return chat.main(argv, prog="minisgl chat")


def _ask(argv: list[str]) -> int:
    from minisgl.cli import ask

    return ask.main(argv, prog="minisgl ask")


def _bench(argv: list[str]) -> int:
    try:
        from minisgl import bench
    except ModuleNotFoundError as e:
        if e.name != "minisgl.bench":
            raise
        bench = None
    # A directory without its __init__.py imports as an empty namespace package.
    if getattr(bench, "main", None) is None:
        print("minisgl bench: this installation has no benchmarks (no minisgl.bench.main)", file=sys.stderr)
        return 2
    return bench.main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_serve, "start the engine for a model and serve it (ZeroMQ and the OpenAI HTTP API)"),
    "serve-dp": (_serve_dp, "serve N engines of a model behind sglang-router (data parallelism)"),
    "chat": (_chat, "chat in the terminal with a running server, over its OpenAI HTTP API"),
    "ask": (_ask, "send one prompt to a running server over ZeroMQ and stream the answer"),
    "bench": (
        _bench,
        "benchmarks: serve (a running server), offline (an engine of its own), engine, stall, plot",
    ),
}


def help_text() -> str:
    rows = "\n".join(f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items())
    return (
        f"{USAGE}\n\nminisgl serves a language model: a Rust scheduler daemon and a Python model worker.\n\n"
        f"commands:\n{rows}\n\n`minisgl COMMAND --help` describes each command's arguments.\n"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("minisgl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stderr.write(help_text())
        return 2
    command, rest = argv[0], argv[1:]
    if command == "help" and rest and rest[0] in COMMANDS:
        return COMMANDS[rest[0]][0](["--help"])
    if command in ("-h", "--help", "help"):
        sys.stdout.write(help_text())
        return 0
    if command == "--version":
        print(f"minisgl {_version()}")
        return 0
    if command not in COMMANDS:
        print(
            f"{USAGE}\nminisgl: unknown command {command!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[command][0](rest)
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("minisgl"):
            raise
        print(f"minisgl {command}: needs the Python package {e.name}: run scripts/setup", file=sys.stderr)
        return 1
