"""Acceptance for the Llama family on the real SmolLM2-135M-Instruct: greedy fp32 tokens on the CPU through
the whole engine equal HF transformers' `generate(do_sample=False)` on the same directory; and its .gguf file
and a hub-cache id for it serve the same tokens as the directory."""

from __future__ import annotations

import pytest
from conftest import cpu_engine_config
from hf_reference import hf_greedy, load_hf_with_tokenizer, prompt_ids
from test_model_sources import fake_hub_cache

from minisgl.client import LLM, SamplingParams

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a short poem about the ocean."}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [
        {"role": "user", "content": "Hi! My name is Ana."},
        {"role": "assistant", "content": "Hello Ana! How can I help you today?"},
        {"role": "user", "content": "What is my name?"},
    ],
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 32
ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "num_pages": 512, "max_batch": 8}


@pytest.fixture(scope="module")
def hf_outputs(smollm2_dir):
    tok, model = load_hf_with_tokenizer(smollm2_dir)
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    return [(i, hf_greedy(model, i, NEW_TOKENS, stop_at_eos=True)) for i in ids]


@pytest.fixture(scope="module")
def smollm2_client(smollm2_dir):
    from minisgl.client import Client
    from minisgl.launch import Engine

    config = cpu_engine_config(smollm2_dir, max_seq_len=2048, **ENGINE_ARGS)
    with Engine(config) as running, Client(running.config.listen, timeout_s=300) as client:
        yield client


def test_greedy_tokens_equal_hf_transformers(smollm2_client, hf_outputs):
    from minisgl.client.llm import prompt_fields

    sampling = {"temperature": 0.0, "max_tokens": NEW_TOKENS}
    rids = [smollm2_client.submit(**prompt_fields(p), sampling=sampling, stream=False) for p in PROMPTS]
    finals = [list(smollm2_client.replies(rid))[-1] for rid in rids]
    for prompt, (hf_prompt, hf_tokens), final in zip(PROMPTS, hf_outputs, finals, strict=True):
        assert final["prompt_tokens"] == len(hf_prompt), prompt
        assert final["token_ids"] == hf_tokens, f"prompt {prompt!r}: {final['text']!r}"
        assert len(hf_tokens) == NEW_TOKENS or final["finish_reason"] == "stop"
    assert "Paris" in finals[0]["text"], finals[0]["text"]


GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
SHORT = [PROMPTS[0], PROMPTS[5]]


@pytest.fixture(scope="module")
def directory_tokens(smollm2_client):
    from minisgl.client.llm import prompt_fields

    sampling = {"temperature": 0.0, "max_tokens": GREEDY.max_tokens}
    return [smollm2_client.generate(**prompt_fields(p), sampling=sampling)["token_ids"] for p in SHORT]


def test_the_gguf_file_serves_the_directorys_tokens(smollm2_gguf, directory_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path / "cache"))
    with LLM(str(smollm2_gguf), **ENGINE_ARGS) as llm:
        assert llm.engine.config.served_model_name == smollm2_gguf.stem
        assert [o.token_ids for o in llm.generate(SHORT, GREEDY)] == directory_tokens


def test_a_hub_id_serves_the_directorys_tokens(smollm2_dir, directory_tokens, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_dir)
    with LLM("HuggingFaceTB/SmolLM2-135M-Instruct", **ENGINE_ARGS) as llm:
        assert llm.engine.config.model == str(snapshot)
        assert [o.token_ids for o in llm.generate(SHORT, GREEDY)] == directory_tokens
