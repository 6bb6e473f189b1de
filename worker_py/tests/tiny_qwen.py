"""Test helper: a tiny random Qwen2 saved as an HF checkpoint, and greedy references from transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from minisgl.worker.config import WorkerConfig


def cpu_config(model_dir, num_pages, page_size, max_batch, max_step_tokens, **kw) -> WorkerConfig:
    """A runner's config on the CPU in float32 (the reference numerics)."""
    return WorkerConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        num_pages=num_pages,
        page_size=page_size,
        max_batch=max_batch,
        max_step_tokens=max_step_tokens,
        **kw,
    )


def make_tiny_qwen(
    path: Path, seed: int = 0, tie: bool = True, dtype: torch.dtype = torch.float32, kv_heads: int = 2
) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        # Larger than the default 0.02 so the random model has peaked logits and varied greedy outputs.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return path
