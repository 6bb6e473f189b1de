"""An HF checkpoint directory from a Qwen2-architecture GGUF file: `config.json`, `generation_config.json`,
`tokenizer.json`, `tokenizer_config.json` and a bf16 `model.safetensors`, dequantized with the `gguf` package
(numpy only). `scripts/assemble_model.py` builds the default model with it, and `minisgl serve FILE.gguf`
(`minisgl.checkpoint.sources`) converts any Qwen2 GGUF the same way.

The tokenizer is rebuilt the way the upstream checkpoint has it (the GGUF keeps only its vocabulary, merges
and token types), so that its ids match HF transformers' and the Rust `tokenizers` crate's.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)

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


class CheckpointError(Exception):
    """A check of the GGUF or of what was built from it failed; the message says which."""


def log(message: str) -> None:
    print(f"gguf: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# config.json and generation_config.json


def field(reader, key: str):
    if key not in reader.fields:
        raise CheckpointError(f"the GGUF has no {key!r} metadata")
    return reader.fields[key].contents()


def float32_value(value: float) -> float:
    """GGUF stores these as float32: 1e-6 reads back as 9.99999997e-07. Keep the shortest float32 spelling."""
    import numpy as np

    return float(str(np.float32(value)))


def build_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"expected a qwen2 GGUF, found {arch!r}")
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
        raise CheckpointError(f"unexpected GGUF tensor {gguf_name!r}")
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
    from tqdm import tqdm

    wanted = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantize", unit="tensor"):
        name = hf_name(tensor.name)
        if name is None:
            continue
        # GGUF lists dimensions fastest-first; HF (row-major) wants them the other way round.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != wanted.get(name):
            raise CheckpointError(f"{tensor.name} -> {name}: shape {shape}, expected {wanted.get(name)}")
        values = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        # F32 tensors come back as read-only views of the mmap; torch wants memory it may write.
        tensors[name] = torch.from_numpy(np.array(values, copy=True)).to(torch.bfloat16)
    absent = sorted(set(wanted) - set(tensors))
    if absent:
        raise CheckpointError(f"the GGUF lacks {len(absent)} tensors, first {absent[0]}")
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
            raise CheckpointError(f"token {i} {tokens[i]!r} has unexpected GGUF type {types[i]}")
        added.append((i, tokens[i], types[i]))
    # Added tokens must follow the vocabulary without gaps, or their ids would shift once the fillers go.
    if [i for i, _, _ in added] != list(range(vocab_size, vocab_size + len(added))):
        raise CheckpointError("the GGUF's added tokens are not contiguous after the BPE vocabulary")
    if any(t != gguf.TokenType.UNUSED for t in types[vocab_size + len(added) :]):
        raise CheckpointError("the GGUF has real tokens after its unused fillers")
    return tokens[:vocab_size], added


def build_tokenizer_json(reader) -> tuple[dict, list[dict]]:
    vocab, added = split_vocabulary(reader)
    merges = [merge.split(" ") for merge in field(reader, "tokenizer.ggml.merges")]
    if any(len(pair) != 2 for pair in merges):
        raise CheckpointError("a GGUF merge is not two space-separated symbols")
    if field(reader, "tokenizer.ggml.model") != "gpt2" or field(reader, "tokenizer.ggml.pre") != "qwen2":
        raise CheckpointError("expected a gpt2 (byte-level BPE) tokenizer with the qwen2 pre-tokenizer")
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
        raise CheckpointError("the GGUF asks for a BOS token; Qwen2.5 has none")
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
            raise CheckpointError(f"tokenizer.json maps {token['content']!r} to the wrong id")
    if tokenizer.encode("hello world").ids != [14990, 1879]:
        raise CheckpointError("tokenizer.json does not encode 'hello world' as Qwen2.5 does")


# ----------------------------------------------------------------------------------------------------
# The directory


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def convert(gguf_path: Path, staging: Path) -> None:
    """Writes the checkpoint files of the GGUF at `gguf_path` into the directory `staging`."""
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
