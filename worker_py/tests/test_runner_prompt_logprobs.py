"""Prompt logprobs through the whole runner on the CPU (a tiny random Qwen2, float32): the entries a step
returns for its positions with a target equal log_softmax of a full eager forward's logits (HF transformers on
the same weights), in any chunking of the prompt and however many rows one LM-head pass takes; a step that
asks for none carries none and allocates nothing for them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_steps import Join, ReadySteps, StepBuilder
from hf_reference import hf_prompt_logprobs, load_hf
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker import runner as runner_module
from minisgl.worker.loop import run_steps
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)

PAGE, PAGES = 4, 128
PROMPT = [17, 301, 5, 88, 88, 412, 9, 250, 3, 77, 140]
OTHER = [40, 41, 42, 43, 44]
TOP = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=6)


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of HF's logits over the whole prompt in one eager forward: [len(PROMPT), vocab]."""
    return hf_prompt_logprobs(load_hf(model_dir), PROMPT)


def make_runner(model_dir) -> ModelRunner:
    return ModelRunner(cpu_config(model_dir, PAGES, PAGE, 4, 64), show_progress=False)


def targets_of(start: int, chunk: list[int]) -> list[int]:
    """The targets of a chunk of PROMPT starting at `start`: each position's successor, none for the last."""
    return [PROMPT[p + 1] if p + 1 < len(PROMPT) else -1 for p in range(start, start + len(chunk))]


def run(model_dir, steps) -> ReadySteps:
    ready = ReadySteps(steps)
    assert run_steps(make_runner(model_dir), ready, ready) == 0
    return ready


def prompt_entries(ready: ReadySteps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every step's prompt logprobs, concatenated in step order."""
    got = [p for p in ready.prompt if p is not None]
    return tuple(np.concatenate([getattr(p, f) for p in got]) for f in ("logprob", "top_ids", "top_logprobs"))


def test_one_step_equals_the_eager_forward_and_other_requests_are_untouched(model_dir, reference):
    b = StepBuilder(PAGES, PAGE)
    # The other request asks for nothing: its positions have no target, and sit before the asking one.
    targets = [-1] * len(OTHER) + targets_of(0, PROMPT)
    step = b.extend([(1, OTHER), (0, PROMPT)], joins=[Join(0), Join(1)], targets=targets, prompt_top=TOP)
    ready = run(model_dir, [step, b.decode([0, 1])])
    logprob, top_ids, top_logprobs = prompt_entries(ready)
    n = len(PROMPT) - 1
    assert logprob.shape == (n,) and top_ids.shape == (n, TOP)
    want = reference[torch.arange(n), torch.tensor(PROMPT[1:])]
    torch.testing.assert_close(torch.from_numpy(logprob), want, rtol=0, atol=1e-4)
    values, ids = reference[:n].topk(TOP, dim=-1)
    assert top_ids.tolist() == ids.tolist()
    torch.testing.assert_close(torch.from_numpy(top_logprobs), values, rtol=0, atol=1e-4)
    assert ready.prompt[1] is None, "a decode step asks for none"
    # The sampled token is what the same prompt samples without asking: the logits of the last position.
    plain = StepBuilder(PAGES, PAGE)
    alone = run(model_dir, [plain.extend([(1, OTHER), (0, PROMPT)], joins=[Join(0), Join(1)])])
    assert alone.results[0][1] == ready.results[0][1]
    assert alone.prompt == [None]


@pytest.mark.parametrize("rows", [256, 3, 1])
def test_any_chunking_and_lm_head_pass_size_give_the_one_step_numbers(
    model_dir, reference, rows, monkeypatch
):
    monkeypatch.setattr(runner_module, "PROMPT_LOGPROB_ROWS", rows)
    b = StepBuilder(PAGES, PAGE)
    steps, start = [], 0
    for size in (4, 1, 6):
        chunk = PROMPT[start : start + size]
        joins = [Join(0)] if start == 0 else []
        steps.append(b.extend([(0, chunk)], joins=joins, targets=targets_of(start, chunk), prompt_top=TOP))
        start += size
    assert start == len(PROMPT)
    ready = run(model_dir, steps)
    logprob, top_ids, _ = prompt_entries(ready)
    n = len(PROMPT) - 1
    want = reference[torch.arange(n), torch.tensor(PROMPT[1:])]
    torch.testing.assert_close(torch.from_numpy(logprob), want, rtol=0, atol=1e-4)
    assert top_ids.tolist() == reference[:n].topk(TOP, dim=-1).indices.tolist()


def test_a_step_that_asks_for_none_pays_nothing(model_dir):
    runner = make_runner(model_dir)
    b = StepBuilder(PAGES, PAGE)
    ready = ReadySteps([b.extend([(0, PROMPT)], joins=[Join(0)]), b.decode([0])])
    assert run_steps(runner, ready, ready) == 0
    assert ready.prompt == [None, None]
    assert runner._host_prompt == [None, None], "no buffer for prompt logprobs was made"
