"""Which attention backend `--attention` picks, and the error when flashinfer is asked for and cannot run."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_qwen import make_tiny_qwen

from minisgl.attention import resolve_backend
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)
HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None


def test_auto_is_torch_on_the_cpu_and_names_pass_through():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("flashinfer", "cpu") == "flashinfer"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", "cpu")


def test_auto_on_cuda_follows_the_package():
    assert resolve_backend("auto", "cuda") == ("flashinfer" if HAVE_FLASHINFER else "torch")


@pytest.mark.skipif(torch.cuda.is_available() and HAVE_FLASHINFER, reason="flashinfer can run here")
def test_forcing_flashinfer_where_it_cannot_run_is_a_clear_error(tmp_path):
    model = make_tiny_qwen(tmp_path / "m")
    with pytest.raises(RuntimeError, match="flashinfer"):
        ModelRunner(model, "cpu", "float32", 16, 4, 4, 64, attention="flashinfer", show_progress=False)


def test_cpu_runner_has_no_graphs_and_no_fused_kernels(tmp_path):
    runner = ModelRunner(make_tiny_qwen(tmp_path / "m"), "cpu", "float32", 16, 4, 4, 64, show_progress=False)
    assert runner.config.attention == "torch"
    assert runner.graphs is None and not runner.fused_kernels
    assert runner.kv_cache.num_pages == runner.num_pages == 16  # no scratch page without graphs
