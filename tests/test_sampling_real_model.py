"""The worker's sampling options on the real default model (fp32, CPU), against HF transformers on the same
directory: greedy tokens with logit bias and the three penalties equal HF generate's with the same processors,
and the logprobs the result ring carries equal log_softmax of HF's logits within 1e-4."""

from __future__ import annotations

import pytest
import torch
from fake_steps import Join, ReadySteps, StepBuilder
from hf_reference import hf_greedy_join, hf_logprobs, load_hf_with_tokenizer

NEW_TOKENS = 12
PAGE = 16


@pytest.fixture(scope="module")
def hf(model_dir):
    return load_hf_with_tokenizer(model_dir)


def test_penalized_greedy_tokens_and_logprobs_match_hf(model_dir, hf):
    from minisgl.worker.config import WorkerConfig
    from minisgl.worker.loop import run_steps
    from minisgl.worker.runner import ModelRunner

    tok, model = hf
    chat = [{"role": "user", "content": "List three fruits, then list them again."}]
    prompts = {
        0: tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ],
        1: tok("def add(a, b):\n    return").input_ids,
    }
    fruit = tok(" apple").input_ids[0]
    joins = {
        0: Join(
            0,
            logprobs=5,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            bias=((fruit, 4.0),),
        ),
        1: Join(1, logprobs=20),
    }
    config = WorkerConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        num_pages=64,
        page_size=PAGE,
        max_batch=4,
        max_step_tokens=512,
    )
    runner = ModelRunner(config, show_progress=False)
    b = StepBuilder(64, PAGE)
    steps = [b.extend(list(prompts.items()), list(joins.values()))]
    steps += [b.decode([0, 1]) for _ in range(NEW_TOKENS - 1)]
    ready = ReadySteps(steps)
    assert run_steps(runner, ready, ready) == 0
    tokens = {s: [out[i] for _, out in ready.results] for i, s in enumerate(prompts)}

    for i, s in enumerate(prompts):
        assert tokens[s] == hf_greedy_join(model, prompts[s], joins[s], NEW_TOKENS), s
        ref = hf_logprobs(model, prompts[s], tokens[s])
        for step, lp in enumerate(ready.logprobs):
            assert lp.top_ids.shape == (2, 20)  # the most either request asked for
            assert abs(lp.logprob[i] - ref[step, tokens[s][step]].item()) < 1e-4
            values, _ = ref[step].topk(20)
            assert torch.allclose(torch.from_numpy(lp.top_logprobs[i]), values, atol=1e-4, rtol=0)
            got_ids = torch.from_numpy(lp.top_ids[i]).long()
            assert torch.allclose(ref[step, got_ids], values, atol=1e-4, rtol=0)
    # The options changed request 0's tokens: the bias and penalties took effect.
    assert tokens[0] != hf_greedy_join(model, prompts[0], Join(0), NEW_TOKENS)
