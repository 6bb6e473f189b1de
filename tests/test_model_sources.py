"""Model sources (minisgl.checkpoint): a checkpoint directory, a GGUF file converted once into the cache, and
a model id found in the Hugging Face hub cache all serve the same model."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from minisgl.checkpoint.gguf import OUTPUT_FILES
from minisgl.checkpoint.sources import CONVERTED_MARKER, ModelNotFound, resolve_model
from minisgl.client import LLM, SamplingParams

GGUF = REPO_ROOT / "models" / ".cache" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = ["def fib(n):", [{"role": "user", "content": "Name a prime number."}]]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_directory_is_served_as_it_is(tiny_model):
    assert resolve_model(str(tiny_model)) == tiny_model


@pytest.mark.parametrize(
    "spec, says",
    [
        ("{tmp}", "without a config.json"),
        ("{tmp}/missing.gguf", "no such GGUF file"),
        ("./nowhere", "not a checkpoint directory, a .gguf file or a Hugging Face model id"),
        ("acme/not-in-the-cache", "not in the Hugging Face cache (HF_HUB_OFFLINE is set)"),
    ],
)
def test_what_cannot_be_served_says_why(tmp_path, monkeypatch, spec, says):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match=says.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(spec.format(tmp=tmp_path))


def fake_hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """The hub cache's layout for one snapshot of `repo_id` holding `model`'s files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_id_in_the_cache_serves_what_its_directory_serves(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # found without a network, or not at all
    snapshot = fake_hub_cache(tmp_path / "hub", "acme/tiny-qwen", tiny_model)
    assert resolve_model("acme/tiny-qwen") == snapshot
    with LLM(str(tiny_model), device="cpu", num_pages=64, max_batch=4) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM("acme/tiny-qwen", device="cpu", num_pages=64, max_batch=4) as llm:
        assert llm.engine.config.model == str(snapshot)
        assert llm.engine.config.served_model_name == "acme/tiny-qwen"
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is not there (scripts/setup downloads it)")
    cache = tmp_path_factory.mktemp("minisgl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISGL_CACHE", str(cache))
        yield resolve_model(str(GGUF)), cache


def test_a_gguf_file_is_converted_once_into_the_default_models_files(converted, model_dir):
    directory, cache = converted
    assert directory.parent == cache / "gguf" and (directory / CONVERTED_MARKER).is_file()
    for name in OUTPUT_FILES:
        assert digest(directory / name) == digest(model_dir / name), name
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINISGL_CACHE", str(cache))
        assert resolve_model(str(GGUF)) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp, "reused, not converted again"


def test_a_gguf_file_serves_the_default_models_tokens(converted, client, monkeypatch):
    _, cache = converted
    monkeypatch.setenv("MINISGL_CACHE", str(cache))
    expected = [
        client.generate(text=PROMPTS[0], sampling={"temperature": 0.0, "max_tokens": 8})["token_ids"],
        client.generate(messages=PROMPTS[1], sampling={"temperature": 0.0, "max_tokens": 8})["token_ids"],
    ]
    with LLM(str(GGUF), device="cpu", dtype="float32", num_pages=256, max_batch=4) as llm:
        assert llm.engine.config.served_model_name == GGUF.stem
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected


def test_the_smollm2_gguf_is_converted_into_its_directorys_files(
    smollm2_gguf, smollm2_dir, tmp_path, monkeypatch
):
    """The second real model, a Llama: its .gguf converts through the cache into what scripts/setup built."""
    monkeypatch.setenv("MINISGL_CACHE", str(tmp_path))
    directory = resolve_model(str(smollm2_gguf))
    assert directory.parent == tmp_path / "gguf"
    for name in OUTPUT_FILES:
        assert digest(directory / name) == digest(smollm2_dir / name), name
