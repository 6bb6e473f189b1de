"""Test helper: small random HF checkpoints of every model family the worker serves, and HF references.

Each checkpoint is made by transformers itself (its config class, its model class, `save_pretrained`:
safetensors, float32), then its config.json is rewritten into the spelling a real checkpoint of that kind
has on disk, because transformers 5 saves its own spelling, which no checkpoint made before it has:

- it writes `"rope_parameters": {"rope_type": ..., "rope_theta": ..., ...}` where real checkpoints have a
  top-level `"rope_theta"` and maybe `"rope_scaling": {...}` (with `"rope_type"`, or in older ones `"type"`);
- it writes `"num_local_experts"` for Qwen3-MoE (its attribute_map target) where real ones have
  `"num_experts"`, `"layer_types"` where real Qwen2/Qwen3 have none, and `"dtype"` for `"torch_dtype"`.

Some fixtures keep the transformers 5 spelling on purpose (what a checkpoint saved by transformers 5 has).
Every rewrite is checked: transformers must read the rewritten config.json back to the same rope parameters
and the same model hyperparameters, so the HF reference (loaded from the directory) is the model we meant.

The random weights use initializer_range 0.2 (peaked logits, varied greedy outputs), and every norm weight
and bias is randomised too: transformers initialises them to 1 and 0, which would let an engine that forgets
a q/k norm weight or a bias pass.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

VOCAB = 512  # what the runner tests use; the engine tests pass the real tokenizer's size
HIDDEN = 64
INIT_RANGE = 0.2
REMOVE = object()  # in config.json edits: drop the key

# Ids of the default model's tokenizer (Qwen2.5), written into the engine tests' checkpoints.
QWEN_BOS, QWEN_EOS = 151643, [151645, 151643]


@dataclass(frozen=True)
class Family:
    """One fixture: how transformers builds it and how its config.json looks on disk."""

    name: str
    config_cls: str  # transformers config class
    model_cls: str  # transformers model class (also config.json's `architectures`)
    kwargs: dict[str, Any]  # config kwargs besides the rope ones
    # What config.json says about rope, verbatim: {"rope_theta": .., "rope_scaling": {..}} (the spelling of
    # real checkpoints) or {"rope_parameters": {..}} (transformers 5's).
    rope_on_disk: dict[str, Any]
    # Other keys to set (REMOVE: remove) in config.json after saving, for the real checkpoints' spelling.
    disk_edits: dict[str, Any] = field(default_factory=dict)
    legacy_spelling: bool = True  # also: num_local_experts -> num_experts, drop layer_types, torch_dtype
    note: str = ""
    # The position past which rope scaling changes anything (original_max_position_embeddings, or for
    # dynamic NTK max_position_embeddings); None where rope is plain or scaled the same everywhere.
    scaled_past: int | None = None
    # Picked so that no greedy step of the runner tests' prompts is a near tie (top-2 logits at least 3e-4 of
    # the logit scale apart), which fp32 rounding differences could flip.
    seed: int = 0


def _common(**over: Any) -> dict[str, Any]:
    kw = {
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "initializer_range": INIT_RANGE,
        "tie_word_embeddings": False,
    }
    kw.update(over)
    return kw


# With head_dim 16 and rope_theta 500000 the 8 rotary wavelengths are 2*pi*500000**(i/8) = 6.3, 32, 167,
# 862, ...; original_max_position_embeddings 64 puts llama3's high-frequency bound at 64/4 = 16 and its
# low-frequency bound at 64/1 = 64: one frequency is kept, one is smoothed, six are divided by the factor.
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_type": "llama3",
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "qwen2",
            "Qwen2Config",
            "Qwen2ForCausalLM",
            _common(),
            {"rope_theta": 1000000.0},
            # Qwen2.5-7B-Instruct: a sliding_window value, but use_sliding_window false (so: not used).
            disk_edits={"sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 2},
            note="Qwen2.5 spelling; q/k/v biases; sliding_window set but use_sliding_window false",
            seed=2,
        ),
        Family(
            "llama3",
            "LlamaConfig",
            "LlamaForCausalLM",
            _common(),
            {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
            note="Llama 3.1 spelling: rope_scaling (rope_type llama3, factor 8) + rope_theta; untied",
            scaled_past=64,
            seed=3,
        ),
        Family(
            "llama3_tied",
            "LlamaConfig",
            "LlamaForCausalLM",
            _common(tie_word_embeddings=True, head_dim=16),
            {"rope_parameters": {**LLAMA3_SCALING, "factor": 32.0, "rope_theta": 500000.0}},
            legacy_spelling=False,
            note="Llama 3.2 shape (tied embeddings, explicit head_dim, factor 32) in transformers 5 spelling",
            scaled_past=64,
            seed=3,
        ),
        Family(
            "llama_linear",
            "LlamaConfig",
            "LlamaForCausalLM",
            _common(),
            # LongChat-style: the old "type" key.
            {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
            note="linear scaling in the oldest spelling (rope_scaling.type)",
            seed=2,
        ),
        Family(
            "llama_dynamic",
            "LlamaConfig",
            "LlamaForCausalLM",
            # Dynamic NTK grows its base past max_position_embeddings, where the scheduler never lets a
            # sequence go: the context here covers every prompt and its new tokens, as the engine serves it.
            _common(max_position_embeddings=128),
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
            legacy_spelling=False,
            note="dynamic NTK (factor 2) within max_position_embeddings 128, transformers 5 spelling",
            scaled_past=None,
            seed=2,
        ),
        Family(
            "llama_yarn",
            "LlamaConfig",
            "LlamaForCausalLM",
            _common(max_position_embeddings=256),
            {
                "rope_theta": 10000.0,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            },
            note="YaRN (factor 4 from 64; default beta_fast 32, beta_slow 1, attention factor 1+0.1 ln 4)",
            scaled_past=64,
            seed=3,
        ),
        Family(
            "mistral",
            "MistralConfig",
            "MistralForCausalLM",
            # Mistral-Nemo shape: head_dim 32 where hidden/heads is 16.
            _common(head_dim=32, sliding_window=None),
            {"rope_theta": 1000000.0},
            note="Mistral v0.3/Nemo: sliding_window null, head_dim larger than hidden/heads",
        ),
        Family(
            "qwen3",
            "Qwen3Config",
            "Qwen3ForCausalLM",
            _common(head_dim=32, tie_word_embeddings=True),
            {"rope_theta": 1000000.0, "rope_scaling": None},
            disk_edits={"sliding_window": None, "use_sliding_window": False, "max_window_layers": 2},
            note="Qwen3-0.6B shape: q/k RMSNorm, head_dim 32 > hidden/heads 16, tied",
            seed=1,
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            _common(
                num_hidden_layers=3,
                head_dim=32,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                moe_intermediate_size=32,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
            ),
            {"rope_theta": 1000000.0, "rope_scaling": None},
            disk_edits={"sliding_window": None, "use_sliding_window": False, "max_window_layers": 3},
            note="Qwen3-30B-A3B spelling: 8 experts top-2, norm_topk_prob, layer 1 dense (mlp_only_layers)",
        ),
        Family(
            "qwen3_moe_v5",
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            _common(
                num_hidden_layers=4,
                head_dim=32,
                num_experts=8,
                num_experts_per_tok=3,
                norm_topk_prob=False,
                moe_intermediate_size=32,
                decoder_sparse_step=2,
            ),
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
            legacy_spelling=False,
            note="as transformers 5 saves it (num_local_experts); decoder_sparse_step 2, top-3, unnormalised",
        ),
    ]
}


def make_checkpoint(
    name: str,
    path: Path,
    vocab_size: int = VOCAB,
    seed: int | None = None,
    tokenizer_from: Path | None = None,
) -> Path:
    """Writes fixture `name` into `path`. With `tokenizer_from` (a model directory), its tokenizer files go
    along and the ids of that tokenizer (Qwen2.5's) become bos/eos, as the scheduler needs."""
    import transformers

    fam = FAMILIES[name]
    seed = fam.seed if seed is None else seed
    kwargs = dict(fam.kwargs, vocab_size=vocab_size)
    rope = fam.rope_on_disk
    if "rope_parameters" in rope:
        kwargs["rope_parameters"] = json.loads(json.dumps(rope["rope_parameters"]))
    else:
        kwargs["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = json.loads(json.dumps(rope["rope_scaling"]))
    if tokenizer_from is not None:
        kwargs.update(bos_token_id=QWEN_BOS, eos_token_id=QWEN_EOS[0], pad_token_id=QWEN_BOS)
    else:
        # The runner never stops a request; the HF references ignore eos as well (see hf_greedy).
        kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = getattr(transformers, fam.config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_cls)(config).to(torch.float32)
    _randomise_norms_and_biases(model, seed)
    model.save_pretrained(path, safe_serialization=True)

    _rewrite_config(path, fam)
    if tokenizer_from is not None:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / file, path / file)
        gen = {"bos_token_id": QWEN_BOS, "eos_token_id": QWEN_EOS, "pad_token_id": QWEN_BOS}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _check_reads_back(path, fam, model.config)
    return path


def make_variant(name: str, path: Path, edits: dict[str, Any]) -> Path:
    """Fixture `name` with config.json keys changed (REMOVE: removed), for the configs that must fail."""
    make_checkpoint(name, path)
    _edit_json(path / "config.json", lambda cfg: _apply(cfg, edits))
    return path


def tokenizer_size(model_dir: Path) -> int:
    """transformers' len(tokenizer) for a tokenizer.json: the highest id, added tokens included, plus one.
    (config.json's vocab_size, 151936 for Qwen2.5, pads the embedding past the ids that decode.)"""
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def _randomise_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # U(0.5, 1.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _rewrite_config(path: Path, fam: Family) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        for key in ("rope_parameters", "rope_theta", "rope_scaling"):
            cfg.pop(key, None)
        cfg.update(json.loads(json.dumps(fam.rope_on_disk)))
        if fam.legacy_spelling:
            if "num_local_experts" in cfg:
                cfg["num_experts"] = cfg.pop("num_local_experts")
            cfg.pop("layer_types", None)
            if "dtype" in cfg:
                cfg["torch_dtype"] = cfg.pop("dtype")
        _apply(cfg, fam.disk_edits)

    _edit_json(path / "config.json", edit)


def _apply(cfg: dict[str, Any], edits: dict[str, Any]) -> None:
    for key, value in edits.items():
        if value is REMOVE:
            cfg.pop(key, None)
        else:
            cfg[key] = value


def _edit_json(file: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    cfg = json.loads(file.read_text())
    edit(cfg)
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


_CHECKED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "sliding_window",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "moe_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
)


def _check_reads_back(path: Path, fam: Family, meant) -> None:
    from transformers import AutoConfig

    got = AutoConfig.from_pretrained(path)
    assert got.architectures == [fam.model_cls], (path, got.architectures)
    assert _rope(got) == _rope(meant), (path, _rope(got), _rope(meant))
    for key in _CHECKED:
        assert getattr(got, key, None) == getattr(meant, key, None), (path, key)


def _rope(config) -> dict[str, Any]:
    params = dict(config.rope_parameters)
    params.pop("type", None)  # the old spelling of rope_type, kept next to it when read
    return params


# --- HF references ---------------------------------------------------------------------------------------
