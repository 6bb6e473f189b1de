"""`minisgl bench`: measure a server online (`serve`), the engine offline (`offline`) or behind a running
server (`engine`), decodes while a long prompt is prefilled (`stall`), draw the results (`plot`), and soak a
server with many clients that check every token (`soak`). Also `python -m minisgl.bench`.

Subcommand modules import what they need (aiohttp, matplotlib, torch) when they run, so that `--help` and the
other subcommands stay light.
"""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; a flag's default after its help, unless the help already says
    it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def parser(prog: str = "minisgl bench") -> argparse.ArgumentParser:
    from minisgl.bench import engine, offline, plot, serve, soak, stall

    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,offline,engine,stall,plot,soak}")
    for name, module, summary in (
        ("serve", serve, "load an OpenAI-compatible server with streamed requests; latency and throughput"),
        ("offline", offline, "start an engine here and time batches of requests through it (throughput)"),
        (
            "engine",
            engine,
            "serve's workload through a running engine's ZeroMQ socket: its own throughput",
        ),
        ("stall", stall, "running decodes' inter-token gaps while a long prompt is prefilled"),
        ("plot", plot, "draw the JSON of `serve` runs: latency percentiles and throughput against load"),
        ("soak", soak, "many streaming clients on both doors, every token checked against a replay alone"),
    ):
        sp = sub.add_parser(
            name,
            help=summary,
            description=module.__doc__.strip(),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(sp)
        sp.set_defaults(func=module.run, subparser=sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sub = args.subparser
    del args.subparser
    try:
        return args.func(args, sub)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
