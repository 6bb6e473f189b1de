"""Which attention backends `--attention` and `--decode-attention` pick, and the error when flashinfer is
asked for and cannot run."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.attention import DECODE_CHOICES, PREFILL_CHOICES, resolve
from minisgl.worker.__main__ import parse_args
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)
HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def test_auto_is_torch_on_the_cpu_and_names_pass_through():
    assert resolve("auto", "auto", "cpu") == ("torch", "torch")
    assert resolve("torch", "auto", "cuda") == ("torch", "torch")
    assert resolve("flashinfer", "triton", "cpu") == ("flashinfer", "triton")
    with pytest.raises(ValueError, match="unknown prefill attention backend"):
        resolve("flash", "auto", "cpu")
    with pytest.raises(ValueError, match="unknown decode attention backend"):
        resolve("auto", "flash", "cpu")


def test_auto_on_cuda_follows_the_packages():
    prefill, decode = resolve("auto", "auto", "cuda")
    assert prefill == ("flashinfer" if HAVE_FLASHINFER else "torch")
    assert decode == ("torch" if prefill == "torch" else "triton" if HAVE_TRITON else "flashinfer")


def test_the_cli_choices_come_from_the_registry():
    assert set(PREFILL_CHOICES) == {"auto", "torch", "flashinfer", "triton"}
    assert set(DECODE_CHOICES) == {"auto", "torch", "flashinfer", "triton"}
    assert (
        parse_args(["--model", "m", "--control", "ipc://x", "--decode-attention", "triton"])[
            0
        ].decode_attention
        == "triton"
    )
    assert (
        parse_args(["--model", "m", "--control", "ipc://x", "--attention", "triton"])[0].attention == "triton"
    )
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--control", "ipc://x", "--attention", "flash"])


@pytest.mark.skipif(torch.cuda.is_available() and HAVE_FLASHINFER, reason="flashinfer can run here")
def test_forcing_flashinfer_where_it_cannot_run_is_a_clear_error(tmp_path):
    model = make_tiny_qwen(tmp_path / "m")
    with pytest.raises(RuntimeError, match="flashinfer"):
        ModelRunner(cpu_config(model, 16, 4, 4, 64, attention="flashinfer"), show_progress=False)


def test_triton_attention_on_the_cpu_is_a_clear_error(tmp_path):
    model = make_tiny_qwen(tmp_path / "m")
    with pytest.raises(RuntimeError, match="TritonBackend runs on cuda"):
        ModelRunner(cpu_config(model, 16, 4, 4, 64, attention="triton"), show_progress=False)


def test_cpu_runner_has_no_graphs_and_no_fused_kernels(tmp_path):
    runner = ModelRunner(cpu_config(make_tiny_qwen(tmp_path / "m"), 16, 4, 4, 64), show_progress=False)
    assert runner.config.attention == "torch"
    assert runner.graphs is None and not runner.fused_kernels
    assert runner.kv_cache.num_pages == runner.num_pages == 16  # no scratch page without graphs
