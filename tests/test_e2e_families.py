"""Every model family through the whole engine (scheduler and worker, CPU fp32): greedy tokens equal HF's.

One small random checkpoint per family (worker_py/tests/hf_families.py), with the default model's tokenizer
and a vocabulary of exactly its ids, so every id the model samples decodes. What the scheduler reads from a
model directory (scheduler/src/model_files.rs): config.json's `vocab_size` and `max_position_embeddings`
(both required), the eos ids from generation_config.json (else config.json), tokenizer.json, and
tokenizer_config.json (the chat template; optional). The checkpoints carry Qwen2.5's bos/eos ids there.

Prompts go in as token ids, so the HF reference needs no tokenizer. The engine runs with max_step_tokens 32:
the longest prompt (90 tokens, past llama3's original_max_position_embeddings of 64) is prefilled in three
chunks, next to the others' decode steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hf_families import QWEN_EOS, make_checkpoint, tokenizer_size
from hf_reference import hf_greedy, load_hf

FAMILIES = ["qwen2", "llama3", "mistral", "qwen3", "qwen3_moe"]
NEW_TOKENS = 24
_rng = random.Random(0)
# Ordinary tokens of Qwen2.5's vocabulary (special ones start at 151643).
PROMPTS = [[_rng.randrange(100, 150000) for _ in range(n)] for n in (5, 21, 90)]


@pytest.fixture(scope="session")
def family_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(2)
    vocab = tokenizer_size(model_dir)
    root = tmp_path_factory.mktemp("families")
    return {
        name: make_checkpoint(name, root / name, vocab_size=vocab, tokenizer_from=model_dir)
        for name in FAMILIES
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_hf_generate(name, family_dirs):
    from minisgl.client import LLM, SamplingParams

    path = family_dirs[name]
    hf = load_hf(path)
    expected = [hf_greedy(hf, p, NEW_TOKENS, stop_at_eos=True) for p in PROMPTS]
    del hf
    with LLM(
        str(path),
        device="cpu",
        dtype="float32",
        attention="torch",
        num_pages=64,
        page_size=16,
        max_batch=4,
        max_step_tokens=32,
        log_level="warn",
    ) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    for prompt, out, tokens in zip(PROMPTS, outs, expected, strict=True):
        assert out.prompt_tokens == len(prompt)
        assert out.token_ids == tokens, f"{name}, prompt of {len(prompt)} tokens"
        assert out.finish_reason == ("stop" if tokens[-1] in QWEN_EOS else "length")
