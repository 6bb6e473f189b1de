"""Configuration dataclasses as command-line flags, both ways: one flag per field (`--max-batch 64`; a field
that is on by default gets `--no-...`), and the argv that gives a config back. The launcher and the worker
use the same fields, so a setting has one name from `minisgl serve` to the runner. Standard library only."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any


def opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def env_opt(var: str, default: str | None, help: str, *, secret: bool = False, **meta: Any) -> Any:
    """A default that $var replaces, read when a config is made (not at import), so that a test suite can set
    it for every engine it starts, in process or not."""
    return dataclasses.field(
        default_factory=lambda: os.environ.get(var) or default,
        repr=not secret,
        metadata={"help": f"{help} (${var})", "secret": secret, **meta},
    )


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, meta, default = f.name.replace("_", "-"), f.metadata, _default(f)
        if isinstance(default, bool):
            # A switch that is on by default is turned off with --no-..., one that is off is turned on.
            name, action, how = (
                (f"--no-{flag}", "store_false", "off") if default else (f"--{flag}", "store_true", "on")
            )
            parser.add_argument(name, dest=f.name, action=action, help=f"{how}: {meta['help']}")
            continue
        kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
        shown = ("set" if default else "not set") if meta.get("secret") else default
        shown = "" if shown is None else f" [{shown}]"
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=default,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=meta["help"] + shown,
        )


def from_flags(cls: type, values: dict[str, Any]) -> Any:
    """The `cls` whose fields are in `values` (an argparse namespace's vars; other keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def to_argv(config: Any, cls: type | None = None) -> list[str]:
    """Flags that give `config`'s values of `cls`'s fields (default: its own class); None is left out."""
    argv: list[str] = []
    for f in dataclasses.fields(cls or type(config)):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        if isinstance(_default(f), bool):
            if value != _default(f):
                argv.append(f"--no-{flag}" if _default(f) else f"--{flag}")
        elif value is not None:
            argv += [f"--{flag}", str(value)]
    return argv
