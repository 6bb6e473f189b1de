"""Where a model comes from. `minisgl serve X` (and `LLM(X)`) takes X as any of:

- an HF checkpoint directory (config.json, tokenizer files, safetensors weights): served as it is;
- a `.gguf` file: converted once into an HF checkpoint directory under the cache (`$MINISGL_CACHE`, default
  `~/.cache/minisgl`), keyed by the file's name, size and modification time, and reused after that;
- a Hugging Face model id (`org/name`): the snapshot in the local hub cache (`$HF_HUB_CACHE`, `$HF_HOME`),
  found without a network; downloaded first when it is not there and the machine is allowed to reach the hub
  (`HF_HUB_OFFLINE` unset).

Both processes are handed the resolved directory: the scheduler reads its tokenizer and config, the worker its
weights.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

# What serving needs from a hub snapshot; a repository may hold much else (other formats, ONNX, GGUFs).
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
CONVERTED_MARKER = ".converted.json"


class ModelNotFound(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("MINISGL_CACHE") or Path.home() / ".cache" / "minisgl")


def resolve_model(spec: str | os.PathLike) -> Path:
    """The HF checkpoint directory that `spec` names, converting or fetching it first when needed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a directory without a config.json: not an HF checkpoint")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"no such GGUF file: {path}")
        return gguf_directory(path)
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return hub_snapshot(text)
    raise ModelNotFound(f"{spec}: not a checkpoint directory, a .gguf file or a Hugging Face model id")


def hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise ModelNotFound(f"{repo_id}: resolving a model id needs the huggingface_hub package ({e})") from e
    # huggingface_hub reads $HF_HUB_CACHE once, at import; read it here, when the model is resolved.
    cache = os.environ.get("HF_HUB_CACHE") or None
    fetch = {"allow_patterns": HUB_FILES, "cache_dir": cache}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **fetch))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false"):
        raise ModelNotFound(f"{repo_id} is not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo_id, **fetch))
    except Exception as e:  # the hub's errors are many (no network, no such repo, gated): say which it was
        raise ModelNotFound(f"{repo_id}: not in the Hugging Face cache, and fetching it failed: {e}") from e


def gguf_directory(gguf: Path) -> Path:
    """The converted checkpoint of `gguf`: built on first use (a minute for a 0.5B model), reused after."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / CONVERTED_MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two engines started at once on the same file: the second waits, then finds the work done.
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / CONVERTED_MARKER).is_file():
            return out
        from minisgl.checkpoint.gguf import convert

        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            convert(gguf, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # Last: a directory without the marker is never taken for complete.
        marker = {"source": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        (staging / CONVERTED_MARKER).write_text(json.dumps(marker) + "\n")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(out)
        staging.rename(out)
    return out
