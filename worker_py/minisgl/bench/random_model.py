"""Models with random weights, for benchmarks that need a model's shapes but not its answers: no weights
travel to the machine that runs them. `scripts/bench_gpu.py` and `minisgl bench offline` share these."""

from __future__ import annotations

import shutil
from pathlib import Path

QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

# Shapes of the families the worker serves, by name: (transformers config class, fields).
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", QWEN25_05B),
    "qwen3-0.6b": (
        "Qwen3Config",
        {
            "vocab_size": 151936,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    ),
    "llama3.2-1b": (
        "LlamaConfig",
        {
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
    ),
    # Qwen3-30B-A3B's layers (128 experts, top 8, expert width 768), four of them.
    "qwen3-moe-4l": (
        "Qwen3MoeConfig",
        {
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "num_hidden_layers": 4,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "max_position_embeddings": 40960,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
    ),
}

# A Qwen2 small enough to start in seconds on a CPU, with the real vocabulary (so the real tokenizer fits).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def make_model(path: Path, seed: int, init_std: float, shape: str = "qwen2.5-0.5b") -> Path:
    """A model of `shape` (`SHAPES`) in bf16, built on the GPU from a fixed seed. `init_std` above HF's 0.02
    makes logits peaked enough for greedy decoding to mean something."""
    import torch
    import transformers

    config_cls, fields = SHAPES[shape]
    config = getattr(transformers, config_cls)(
        **fields, initializer_range=init_std, bos_token_id=None, eos_token_id=None
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return path


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=QWEN25_05B["vocab_size"], num_key_value_heads=2, **TINY)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def copy_tokenizer(tokenizer_dir: Path, model_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, Path(model_dir) / name)
