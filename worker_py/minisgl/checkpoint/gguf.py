"""An HF checkpoint directory from a GGUF file: `config.json`, `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json` and a bf16 `model.safetensors`, dequantized with the `gguf` package (numpy only).
`scripts/assemble_model.py` builds the real models with it, and `minisgl serve FILE.gguf`
(`minisgl.checkpoint.sources`) converts any supported GGUF the same way.

Architectures (`gguf_arch.ARCHITECTURES`): qwen2 -> Qwen2ForCausalLM, llama -> LlamaForCausalLM, qwen3 ->
Qwen3ForCausalLM, qwen3moe -> Qwen3MoeForCausalLM. The pieces: `gguf_meta` (reading metadata), `gguf_arch`
(the per-architecture tables, config.json), `gguf_rope` (rope scaling), `gguf_weights` (tensors),
`gguf_tokenizer` (the tokenizer files, rebuilt the way the upstream checkpoint has them: the GGUF keeps only
its vocabulary, merges, token types and the pre-tokenizer's name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from minisgl.checkpoint.gguf_arch import ARCHITECTURES, architecture_of, build_config, build_generation_config
from minisgl.checkpoint.gguf_meta import CheckpointError, architecture, log, optional_field
from minisgl.checkpoint.gguf_tokenizer import (
    build_tokenizer_config,
    build_tokenizer_json,
    check_tokenizer,
    read_vocabulary,
    stop_token_ids,
)
from minisgl.checkpoint.gguf_weights import hf_name, plan_embeddings, vocab_rows, write_weights

__all__ = ["ARCHITECTURES", "OUTPUT_FILES", "CheckpointError", "convert", "hf_name", "write_json"]

OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def convert(gguf_path: Path, staging: Path) -> None:
    """Writes the checkpoint files of the GGUF at `gguf_path` into the directory `staging`."""
    import gguf

    started = time.monotonic()
    reader = gguf.GGUFReader(str(gguf_path))
    arch = architecture(reader)
    architecture_of(arch)  # an unknown architecture fails here, by name, before any work
    embeddings = plan_embeddings(reader)
    config = build_config(reader, arch, vocab_rows(reader, embeddings), embeddings.tied)
    vocab = read_vocabulary(reader)
    tokenizer, added_tokens = build_tokenizer_json(reader, vocab)
    tokenizer_config = build_tokenizer_config(reader, arch, vocab, added_tokens)
    pad = optional_field(reader, "tokenizer.ggml.padding_token_id")
    generation_config = build_generation_config(
        arch, config, None if pad is None else int(pad), stop_token_ids(reader, vocab)
    )
    # Tokenizer files first: they are small, and other work waits on them more than on the weights.
    write_json(staging / "tokenizer.json", tokenizer)
    check_tokenizer(reader, staging / "tokenizer.json", added_tokens)
    write_json(staging / "tokenizer_config.json", tokenizer_config)
    write_json(staging / "config.json", config)
    write_json(staging / "generation_config.json", generation_config)
    write_weights(reader, arch, config, embeddings, staging / "model.safetensors")
    log(f"converted {arch} in {time.monotonic() - started:.1f} s")
