"""What the runner allocates and reports for the handshake, and the limits it enforces."""

from __future__ import annotations

import pytest
import torch
from fake_steps import StepBuilder
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.worker.kv_cache import KVCacheShape
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tiny_qwen"), seed=5)


def test_model_facts_for_the_hello(model_dir):
    runner = ModelRunner(cpu_config(model_dir, 32, 8, 4, 64), show_progress=False)
    assert runner.model_facts() == {
        "architecture": "Qwen2ForCausalLM",
        "vocab_size": 512,
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "dtype": "float32",
        "device": "cpu",
    }
    assert (runner.num_pages, runner.page_size, runner.max_batch, runner.max_step_tokens) == (32, 8, 4, 64)
    assert runner.kv_cache.k(1).shape == (32, 8, 2, 16)


def test_kv_pages_from_a_memory_budget(model_dir):
    per_page = KVCacheShape(2, 4, 2, 16, torch.float32).bytes_per_page
    runner = ModelRunner(
        cpu_config(model_dir, None, 4, 4, 64, kv_bytes=50 * per_page + 1), show_progress=False
    )
    assert runner.num_pages == 50 and runner.kv_cache.nbytes == 50 * per_page
    # On the CPU, without a page count or a budget: 1 GiB of KV.
    default = ModelRunner(cpu_config(model_dir, None, 4, 4, 64), show_progress=False)
    assert default.num_pages == (1 << 30) // per_page
    with pytest.raises(ValueError, match="holds no page"):
        ModelRunner(cpu_config(model_dir, None, 4, 4, 64, kv_bytes=per_page - 1), show_progress=False)


def test_steps_beyond_the_limits_are_refused(model_dir):
    runner = ModelRunner(cpu_config(model_dir, 64, 4, 2, 16), show_progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        runner.run_step(StepBuilder(64, 4).extend([(0, [1]), (1, [1]), (2, [1])]))
    with pytest.raises(ValueError, match="exceeds"):
        runner.run_step(StepBuilder(64, 4).extend([(0, list(range(17)))]))
    out = runner.run_step(StepBuilder(64, 4).extend([(0, list(range(10))), (1, list(range(6)))]))
    assert out.dtype == torch.int32 and out.shape == (2,) and out.device.type == "cpu"
