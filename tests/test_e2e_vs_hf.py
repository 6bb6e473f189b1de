"""Acceptance: greedy fp32 tokens on the CPU equal HF transformers' for the same model directory."""

from __future__ import annotations

import pytest
from hf_reference import hf_greedy, load_hf_with_tokenizer, prompt_ids

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the sum of a list."}],
    [{"role": "user", "content": "用中文简单介绍一下快速排序算法。"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Explain what a Rust borrow checker does, with a short example."}],
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "# A SQL query that counts the users per country\nSELECT",
    "北京是中国的首都，",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_outputs(model_dir):
    tok, model = load_hf_with_tokenizer(model_dir)
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    return [(i, hf_greedy(model, i, NEW_TOKENS, stop_at_eos=True)) for i in ids]


def test_greedy_tokens_equal_hf_transformers(client, hf_outputs):
    from minisgl.client.llm import prompt_fields

    sampling = {"temperature": 0.0, "max_tokens": NEW_TOKENS}
    rids = [client.submit(**prompt_fields(p), sampling=sampling, stream=False) for p in PROMPTS]
    finals = [list(client.replies(rid))[-1] for rid in rids]
    for prompt, (hf_prompt, hf_tokens), final in zip(PROMPTS, hf_outputs, finals, strict=True):
        assert final["prompt_tokens"] == len(hf_prompt), prompt
        assert final["token_ids"] == hf_tokens, f"prompt {prompt!r}: {final['text']!r}"
        assert len(hf_tokens) == NEW_TOKENS or final["finish_reason"] == "stop"
