"""The start-up warm-up runs extend steps of every size that fits, and leaves nothing a request can see."""

from __future__ import annotations

import pytest
from fake_steps import Join, StepBuilder
from tiny_qwen import make_tiny_qwen

from minisgl.worker.runner import ModelRunner
from minisgl.worker.warm_up import extend_step, warm_up


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny"))


def runner(model_dir, num_pages: int = 64) -> ModelRunner:
    return ModelRunner(
        model_dir, "cpu", "float32", num_pages, 4, max_batch=8, max_tokens=256, show_progress=False
    )


def test_extend_step_lays_out_whole_prompts_over_fresh_pages():
    step = extend_step(reqs=3, length=10, page_size=4, vocab=7)
    assert step.qo_indptr.tolist() == [0, 10, 20, 30] and step.kv_indptr.tolist() == [0, 3, 6, 9]
    assert step.kv_last_page_len.tolist() == [2, 2, 2] and step.seq_len.tolist() == [10, 10, 10]
    assert step.positions.tolist()[:12] == [*range(10), 0, 1]
    # Token 5 of request 1 sits in its second page (page 4), offset 1.
    assert step.out_loc[15] == 4 * 4 + 1 and len(set(step.out_loc.tolist())) == 30
    assert step.input_ids.max() < 7 and step.join_slot.tolist() == [0, 1, 2]


def test_warm_up_changes_no_later_request(model_dir):
    warm, cold = runner(model_dir), runner(model_dir)
    # 64 pages of 4 tokens: sizes of 32 to 256 tokens fit (256 tokens = 64 pages); a second pool that holds
    # only 32 tokens' pages stops early instead of writing past its end.
    assert warm_up(warm) > 0
    assert warm_up(runner(model_dir, num_pages=8)) >= 0
    prompts = [(0, [5, 6, 7, 8, 9]), (3, list(range(40, 61)))]
    joins = [Join(0), Join(3, temperature=0.9, seed=4)]
    outputs = []
    for r in (warm, cold):
        b = StepBuilder(r.num_pages, 4, seed=1)
        tokens = [r.run_step(b.extend(prompts, joins)).tolist()]
        tokens += [r.run_step(b.decode([0, 3])).tolist() for _ in range(6)]
        outputs.append(tokens)
    assert outputs[0] == outputs[1]
