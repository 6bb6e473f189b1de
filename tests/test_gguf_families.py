"""The GGUF converter on each architecture it knows, and on the real SmolLM2-135M-Instruct.

The round trips: a small random HF model (transformers) -> a GGUF written here the way llama.cpp's converter
writes one (its tensor names; for llama, each head's q and k rows reordered into its rotary layout; stacked
experts; rope scaling as metadata or as llama3 frequency divisors) -> minisgl's converter -> HF loads the
directory -> logits equal the original model's. The weights are rounded to bf16 first, so the converter's bf16
checkpoint holds exactly the original values and the logits agree to fp32 precision.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from minisgl.checkpoint.gguf import CheckpointError, convert
from minisgl.checkpoint.gguf_weights import unpermute_rotary

# ----------------------------------------------------------------------------------------------------
# A tiny byte-level BPE tokenizer, SmolLM2-shaped: control tokens first, then the 256 byte symbols and a few
# merges, then unused fillers up to the embedding's row count.

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w")]
FILLERS = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_symbols() -> list[str]:
    """GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for
    themselves, the others take code points from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


TOKENS = CONTROL + byte_symbols() + [a + b for a, b in MERGES]
VOCAB_ROWS = len(TOKENS) + FILLERS


def add_tokenizer(writer: gguf.GGUFWriter, pre: str, add_bos: bool = False) -> None:
    tokens = TOKENS + [f"[PAD{i}]" for i in range(len(TOKENS), VOCAB_ROWS)]
    types = (
        [gguf.TokenType.CONTROL] * len(CONTROL)
        + [gguf.TokenType.NORMAL] * (len(TOKENS) - len(CONTROL))
        + [gguf.TokenType.UNUSED] * FILLERS
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------------
# llama.cpp's side, written from its conventions


def permute_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's llama layout: within each head, row j of the first half and row j of the second half of
    the HF layout become rows 2j and 2j+1."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps.weight",
    "up_proj": "ffn_up_exps.weight",
    "down_proj": "ffn_down_exps.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensors(hf: dict[str, np.ndarray], config, permute: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in hf.items():
        if name in GLOBAL_NAMES:
            out[GLOBAL_NAMES[name]] = value
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest.startswith("mlp.experts."):
            _, _, expert, proj, _ = rest.split(".")
            experts.setdefault((layer, proj), {})[int(expert)] = value
            continue
        if permute and rest.startswith("self_attn.q_proj."):
            value = permute_rotary(value, config.num_attention_heads)
        if permute and rest.startswith("self_attn.k_proj."):
            value = permute_rotary(value, config.num_key_value_heads)
        out[f"blk.{layer}.{LAYER_NAMES[rest]}"] = value
    for (layer, proj), by_expert in experts.items():
        out[f"blk.{layer}.{EXPERT_NAMES[proj]}"] = np.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def llama3_divisors(factor, low, high, original, theta, head_dim) -> np.ndarray:
    """What llama.cpp's converter stores as rope_freqs.weight for Llama 3 scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_rope_scaling(writer: gguf.GGUFWriter, config, tensors: dict[str, np.ndarray]) -> None:
    scaling = getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif kind == "llama3":
        tensors["rope_freqs.weight"] = llama3_divisors(
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"],
            scaling["rope_theta"],
            head_dim(config),
        )


def write_gguf(path: Path, arch: str, config, hf: dict[str, np.ndarray], **options) -> Path:
    """`hf` (HF tensor names, as save_pretrained writes them) as a GGUF of architecture `arch`."""
    tensors = gguf_tensors(hf, config, permute=options.get("permute", arch == "llama"))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if arch.startswith("qwen3"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == "qwen3moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    add_rope_scaling(writer, config, tensors)
    add_tokenizer(writer, options.get("pre", "smollm"), options.get("add_bos", False))
    quantized = options.get("quantized", {})
    for name, value in tensors.items():
        if name in quantized:
            kind = quantized[name]
            writer.add_tensor(name, gguf.quantize(value, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------------------------------
# Small random HF models


def small_model(family: str, tied: bool = True, rope_scaling: dict | None = None):
    import transformers

    common = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB_ROWS,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if family == "llama":
        # transformers adds rope_theta to the dict it is given: hand it a copy.
        scaling = None if rope_scaling is None else dict(rope_scaling)
        config = transformers.LlamaConfig(**common, head_dim=16, rope_scaling=scaling)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        # A head size that is not hidden / heads, as in the Qwen3 releases.
        config = transformers.Qwen3Config(**common, head_dim=32)
        model = transformers.Qwen3ForCausalLM(config)
    elif family == "qwen3moe":
        config = transformers.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        raise AssertionError(family)
    # Weights large enough that a misplaced row shows in the logits, rounded to bf16 (what the converter
    # writes).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_((1 + 0.2 * noise) if name.endswith("norm.weight") else 0.3 * noise)
            p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def saved_tensors(model, directory: Path) -> dict[str, np.ndarray]:
    """The tensors as save_pretrained writes them (HF's on-disk names: one tensor per expert)."""
    from safetensors.numpy import load_file

    model.save_pretrained(directory)
    return load_file(str(directory / "model.safetensors"))


TOKENS_IN = torch.tensor([[3 + b for b in b"The quick brown fox jumps over the lazy dog; hello world 0123!"]])


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(TOKENS_IN).logits


def round_trip(tmp_path: Path, family: str, arch: str, model, **options) -> Path:
    hf = saved_tensors(model, tmp_path / "hf")
    path = write_gguf(tmp_path / f"{family}.gguf", arch, model.config, hf, **options)
    out = tmp_path / "converted"
    out.mkdir()
    convert(path, out)
    return out


def load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------------------
# Round trips

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that two of the eight frequencies of a 16-wide head fall in the blend.
    "original_max_position_embeddings": 2048,
}


@pytest.mark.parametrize(
    "family, arch, tied, rope_scaling, hf_class",
    [
        ("llama", "llama", True, None, "LlamaForCausalLM"),
        ("llama", "llama", False, None, "LlamaForCausalLM"),
        ("llama", "llama", True, {"rope_type": "linear", "factor": 2.0}, "LlamaForCausalLM"),
        (
            "llama",
            "llama",
            True,
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
            "LlamaForCausalLM",
        ),
        ("llama", "llama", True, LLAMA3, "LlamaForCausalLM"),
        ("qwen2", "qwen2", True, None, "Qwen2ForCausalLM"),
        ("qwen3", "qwen3", True, None, "Qwen3ForCausalLM"),
        ("qwen3", "qwen3", False, None, "Qwen3ForCausalLM"),
        ("qwen3moe", "qwen3moe", False, None, "Qwen3MoeForCausalLM"),
    ],
    ids=[
        "llama",
        "llama-untied",
        "llama-linear",
        "llama-yarn",
        "llama3-rope",
        "qwen2",
        "qwen3",
        "qwen3-untied",
        "qwen3moe",
    ],
)
def test_round_trip_reproduces_the_logits(tmp_path, family, arch, tied, rope_scaling, hf_class):
    torch.manual_seed(0)
    original = small_model(family, tied, rope_scaling)
    out = round_trip(tmp_path, family, arch, original)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_class]
    assert config["tie_word_embeddings"] is tied
    assert config["vocab_size"] == VOCAB_ROWS
    if rope_scaling is not None:
        assert config["rope_scaling"] == rope_scaling
    converted = load(out)
    assert type(converted).__name__ == hf_class
    expected = logits(original)
    assert expected.abs().max() > 1.0, "logits too small to show a misplaced weight"
    torch.testing.assert_close(logits(converted), expected, rtol=1e-5, atol=1e-5)


def test_a_llama_gguf_without_the_rotary_reordering_gives_other_logits(tmp_path):
    """The round trip above notices the un-permutation: skip llama.cpp's reordering and the logits differ."""
    original = small_model("llama")
    out = round_trip(tmp_path, "llama", "llama", original, permute=False)
    assert not torch.allclose(logits(load(out)), logits(original), atol=1e-3)


def test_unpermute_inverts_llama_cpps_rotary_layout():
    rows = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    permuted = permute_rotary(rows, heads=4)
    assert not np.array_equal(permuted, rows)
    # Head 0's first rows, llama.cpp's way: the first and second halves' row 0, then their row 1.
    assert permuted[:4, 0].tolist() == [0, 8 * 3, 3, 9 * 3]
    np.testing.assert_array_equal(unpermute_rotary(permuted, heads=4), rows)


def test_one_matrix_stored_twice_is_tied_to_its_finer_copy(tmp_path):
    """Like the default model's GGUF: token_embd and output hold the same matrix, quantized twice."""
    original = small_model("llama", tied=True)
    hf = saved_tensors(original, tmp_path / "hf")
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    path = write_gguf(
        tmp_path / "twice.gguf",
        "llama",
        original.config,
        hf,
        quantized={"token_embd.weight": gguf.GGMLQuantizationType.Q8_0},
    )
    out = tmp_path / "converted"
    out.mkdir()
    convert(path, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    # output.weight (F32) is the finer copy: the converted model is the original exactly.
    torch.testing.assert_close(logits(load(out)), logits(original), rtol=1e-5, atol=1e-5)


def test_the_tokenizer_files(tmp_path):
    out = round_trip(tmp_path, "llama", "llama", small_model("llama"))
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hello, space_w = TOKENS.index("hello"), TOKENS.index("Ġw")
    expected = [hello, space_w] + [TOKENS.index(c) for c in "orld"] + [TOKENS.index("Ġ"), TOKENS.index("1")]
    text = "hello world 1"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == expected
    hf = AutoTokenizer.from_pretrained(out)
    assert hf(text).input_ids == expected
    assert len(hf) == len(TOKENS), "the unused fillers are not tokens"
    assert hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # the chat turn's end, then the document's


def test_a_tokenizer_that_adds_bos(tmp_path):
    out = round_trip(tmp_path, "llama", "llama", small_model("llama"), add_bos=True)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out)
    assert hf("hello").input_ids == [1, TOKENS.index("hello")]
    assert hf("hello", add_special_tokens=False).input_ids == [TOKENS.index("hello")]
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<|im_start|>"


# ----------------------------------------------------------------------------------------------------
# What it refuses


def test_an_unknown_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "gemma3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'gemma3' is not supported"):
        convert(tmp_path / "other.gguf", tmp_path)


def test_an_unknown_pre_tokenizer_is_named(tmp_path):
    original = small_model("llama")
    path = write_gguf(
        tmp_path / "m.gguf", "llama", original.config, saved_tensors(original, tmp_path / "hf"), pre="falcon"
    )
    with pytest.raises(CheckpointError, match="GGUF pre-tokenizer 'falcon' is not supported"):
        convert(path, tmp_path)


# ----------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (scripts/setup assembles it)


def test_smollm2_is_a_tied_llama(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "rope_scaling": None,
        "attention_bias": False,
    }
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, then <|endoftext|>


SMOLLM2_TEXTS = [
    "Hello, world! It's a test 12345.",
    "def add(a, b):\n    return a + b  # sum\n\n",
    "café naïve résumé 中文 🙂",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


def test_smollm2_tokenizer_agrees_with_itself_and_splits_digits(smollm2_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in SMOLLM2_TEXTS:
        ids = fast.encode(text, add_special_tokens=False).ids
        assert hf(text, add_special_tokens=False).input_ids == ids, text
        assert fast.decode(ids, skip_special_tokens=False) == text
    assert fast.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1
    assert fast.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2
    prompt = hf.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "question, answer",
    [("What is the capital of France?", "Paris"), ("What is 2+2?", "4")],
)
def test_smollm2_answers_in_hf_transformers(smollm2_dir, question, answer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer in text, text
