"""The runner's launch/collect split on the CPU: two steps in flight give the tokens of one at a time."""

from __future__ import annotations

import pytest
import torch
from fake_steps import Join, StepBuilder
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)

PAGE_SIZE, NUM_PAGES = 4, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=7)


def make_runner(model_dir) -> ModelRunner:
    return ModelRunner(cpu_config(model_dir, NUM_PAGES, PAGE_SIZE, 4, 64), show_progress=False)


def steps(builder: StepBuilder, decodes: int):
    """A prefill of three requests (one sampled with a seed), then decodes referring to the last tokens."""
    joins = [Join(0), Join(1, temperature=0.8, top_k=20, seed=99), Join(3)]
    yield builder.extend([(0, [5, 6, 7]), (1, [8, 9]), (3, [10, 11, 12, 13])], joins)
    for _ in range(decodes):
        yield builder.decode([3, 1, 0])


def test_two_in_flight_equal_one_at_a_time(model_dir):
    sequential = make_runner(model_dir)
    one_at_a_time = [sequential.run_step(s).tolist() for s in steps(StepBuilder(NUM_PAGES, PAGE_SIZE), 8)]

    runner = make_runner(model_dir)
    got, pending = [], None
    for step in steps(StepBuilder(NUM_PAGES, PAGE_SIZE), 8):
        handle = runner.launch(step)
        if pending is not None:
            got.append(runner.collect(pending).tolist())
        pending = handle
    got.append(runner.collect(pending).tolist())
    assert got == one_at_a_time


def test_a_third_step_in_flight_is_refused(model_dir):
    runner = make_runner(model_dir)
    it = steps(StepBuilder(NUM_PAGES, PAGE_SIZE), 4)
    first, _second = runner.launch(next(it)), runner.launch(next(it))
    with pytest.raises(RuntimeError, match="without collecting"):
        runner.launch(next(it))
    runner.collect(first)
    runner.launch(next(it))
