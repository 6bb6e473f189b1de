"""Fixtures shared by the cross-process and end-to-end tests: the model directory and one running engine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The worker's test helpers (the HF reference, checkpoints of each family, the fake scheduler) serve here too.
sys.path.insert(0, str(REPO_ROOT / "worker_py" / "tests"))

# Every engine a test starts without naming an HTTP address (the LLM class, `python -m minisgl.launch`) gets
# an ephemeral port from the OS instead of 8000, so tests never collide on it, with each other or with
# anything else on the machine.
os.environ["MINISGL_HTTP"] = "127.0.0.1:0"


def model_dir_or_skip() -> Path:
    path = Path(os.environ.get("MINISGL_MODEL", REPO_ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"))
    if not (path / "config.json").exists():
        if os.environ.get("MINISGL_REQUIRE_MODEL") == "1":
            pytest.fail(f"the model directory {path} is missing: run scripts/setup (MINISGL_REQUIRE_MODEL=1)")
        pytest.skip(f"no model at {path} (run scripts/setup)")
    return path


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return model_dir_or_skip()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the end-to-end tests run against: the real default model, fp32 on the CPU, with a context short enough
# that an over-long prompt is cheap to build.
E2E_MAX_SEQ_LEN = 4096
E2E_MAX_BATCH = 48


def cpu_engine_config(model_dir: Path, **overrides):
    """An engine of `model_dir` on the CPU in float32, on free loopback ports: the end-to-end tests' engine,
    with `overrides` (EngineConfig's fields)."""
    from minisgl.launch import EngineConfig

    fields = {
        "model": str(model_dir),
        "listen": f"tcp://127.0.0.1:{free_tcp_port()}",
        "http": f"127.0.0.1:{free_tcp_port()}",
        "device": "cpu",
        "dtype": "float32",
        "num_pages": 2048,
        "page_size": 16,
        "max_batch": E2E_MAX_BATCH,
        "max_step_tokens": 2048,
        "max_seq_len": E2E_MAX_SEQ_LEN,
        "log_level": os.environ.get("MINISGL_LOG", "info"),
        "ready_timeout_s": 300,
    }
    return EngineConfig(**(fields | overrides))


@pytest.fixture(scope="session")
def engine(model_dir: Path):
    from minisgl.launch import Engine

    with Engine(cpu_engine_config(model_dir)) as running:
        yield running


@pytest.fixture
def client(engine):
    from minisgl.client import Client

    with Client(engine.config.listen, timeout_s=300) as c:
        yield c


# A tiny random Qwen2 with the real tokenizer: engines that start in seconds, for lifecycle tests.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="session")
def tiny_model(model_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(TINY, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


# The second real model, a Llama: SmolLM2-135M-Instruct, assembled by scripts/setup next to the default model
# (docs/models.md). Missing, its tests skip locally and fail under MINISGL_REQUIRE_MODEL=1 (CI), as above.
SMOLLM2_DIR = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = REPO_ROOT / "models" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def required_file_or_skip(path: Path, what: str) -> Path:
    if not path.exists():
        if os.environ.get("MINISGL_REQUIRE_MODEL") == "1":
            pytest.fail(f"{what} {path} is missing: run scripts/setup (MINISGL_REQUIRE_MODEL=1)")
        pytest.skip(f"no {what} at {path} (run scripts/setup)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return required_file_or_skip(SMOLLM2_DIR / "config.json", "SmolLM2 model directory").parent


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return required_file_or_skip(SMOLLM2_GGUF, "SmolLM2 GGUF")
