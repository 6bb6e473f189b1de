"""Config parsing and checkpoint loading: merged shards, dtype casts, strictness."""

from __future__ import annotations

import json

import pytest
import torch
from fake_steps import StepBuilder
from hf_reference import hf_last_logits, load_hf
from safetensors.torch import load_file, save_file
from tiny_qwen import cpu_config, make_tiny_qwen

from minisgl.layers import LayerOptions
from minisgl.models import ModelConfig, load_model
from minisgl.worker.runner import ModelRunner

torch.set_num_threads(1)
FP32 = LayerOptions(torch.float32)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("tied"), seed=1)


def test_config_from_hf_dir(tied_dir, tmp_path):
    cfg = ModelConfig.from_dir(tied_dir)
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        "Qwen2ForCausalLM",
        512,
        64,
        128,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (10000.0, 1e-6, 256)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == ()
    with pytest.raises(AttributeError):
        cfg.vocab_size = 1  # frozen

    # The shape of the real Qwen2.5 files: top-level rope_theta, eos in generation_config.json as a list.
    legacy = json.loads((tied_dir / "config.json").read_text())
    del legacy["rope_parameters"]
    legacy.update(rope_theta=1000000.0, eos_token_id=151643, sliding_window=32768, use_sliding_window=False)
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert ModelConfig.from_dir(tmp_path).eos_token_ids == (151643,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.rope_theta == 1e6 and cfg.eos_token_ids == (151645, 151643)

    for bad in ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, {"use_sliding_window": True}):
        (tmp_path / "config.json").write_text(json.dumps({**legacy, **bad}))
        with pytest.raises(NotImplementedError):
            ModelConfig.from_dir(tmp_path)


def test_merged_projections_hold_the_checkpoint_rows(tied_dir):
    model = load_model(tied_dir, FP32, "cpu", show_progress=False)
    ckpt = load_file(tied_dir / "model.safetensors")
    p = "model.layers.1."
    qkv = model.model.layers[1].self_attn.qkv_proj
    for part in ("weight", "bias"):
        expected = torch.cat([ckpt[f"{p}self_attn.{x}_proj.{part}"] for x in "qkv"])
        assert torch.equal(getattr(qkv, part), expected)
    gate_up = model.model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(gate_up, torch.cat([ckpt[f"{p}mlp.gate_proj.weight"], ckpt[f"{p}mlp.up_proj.weight"]]))
    assert model.lm_head.weight is None  # tied: the embedding's


def prefill_logits(model_dir, prompt):
    runner = ModelRunner(cpu_config(model_dir, 16, 4, 2, 64), show_progress=False)
    return runner.forward_logits(StepBuilder(16, 4).extend([(0, prompt)]))[0]


def test_bf16_checkpoint_runs_in_fp32(tmp_path):
    model_dir = make_tiny_qwen(tmp_path, seed=2, dtype=torch.bfloat16)
    assert next(iter(load_file(model_dir / "model.safetensors").values())).dtype == torch.bfloat16
    model = load_model(model_dir, FP32, "cpu", show_progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    torch.testing.assert_close(
        prefill_logits(model_dir, prompt), hf_last_logits(load_hf(model_dir), prompt), atol=1e-4, rtol=0
    )


def test_untied_lm_head(tmp_path):
    model_dir = make_tiny_qwen(tmp_path, seed=3, tie=False)
    model = load_model(model_dir, FP32, "cpu", show_progress=False)
    assert model.lm_head.weight is not None
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    prompt = [7, 7, 8, 100, 511]
    torch.testing.assert_close(
        prefill_logits(model_dir, prompt), hf_last_logits(load_hf(model_dir), prompt), atol=1e-4, rtol=0
    )


def test_missing_or_unknown_tensors_are_errors(tied_dir, tmp_path):
    ckpt = load_file(tied_dir / "model.safetensors")
    (tmp_path / "config.json").write_text((tied_dir / "config.json").read_text())

    partial = dict(ckpt)
    del partial["model.layers.0.self_attn.k_proj.weight"]  # one shard of a merged parameter
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="qkv_proj.weight"):
        load_model(tmp_path, FP32, "cpu", show_progress=False)

    save_file({**ckpt, "model.layers.0.mystery.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="mystery"):
        load_model(tmp_path, FP32, "cpu", show_progress=False)

    wrong = dict(ckpt)
    wrong["model.norm.weight"] = torch.zeros(65)
    save_file(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        load_model(tmp_path, FP32, "cpu", show_progress=False)


def test_sharded_checkpoint(tied_dir, tmp_path):
    ckpt = load_file(tied_dir / "model.safetensors")
    names = sorted(ckpt)
    (tmp_path / "config.json").write_text((tied_dir / "config.json").read_text())
    save_file({n: ckpt[n] for n in names[::2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({n: ckpt[n] for n in names[1::2]}, tmp_path / "model-00002-of-00002.safetensors")
    a = load_model(tmp_path, FP32, "cpu", show_progress=False)
    b = load_model(tied_dir, FP32, "cpu", show_progress=False)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)
