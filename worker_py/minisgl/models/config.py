"""The shape of a model, read from a Hugging Face checkpoint directory.

A setting that changes what the model computes and that the engine does not implement is refused here, at
load, with the field's name: serving a different model silently would be worse than not starting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minisgl.layers.rotary import RopeScaling

# rope_scaling / rope_parameters keys and the RopeScaling field each one sets.
_ROPE_FIELDS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_position",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "truncate": "truncate",
}
_ROPE_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


class UnsupportedConfig(NotImplementedError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # The whole config.json, for what only one family reads (its experts, say).
    hf: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return cls.from_hf_dict(cfg, gen)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        architectures = cfg.get("architectures") or ["Qwen2ForCausalLM"]
        num_heads = cfg["num_attention_heads"]
        _refuse_unsupported(cfg)
        theta, scaling = _rope(cfg)
        return cls(
            architecture=architectures[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rope_theta=theta,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg["max_position_embeddings"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=_eos_ids(gen or {}, cfg),
            rope_scaling=scaling,
            hf=cfg,
        )


def _refuse(field_: str, value: Any, why: str) -> None:
    raise UnsupportedConfig(f"config.json: {field_} = {value!r} is not supported: {why}")


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        _refuse("hidden_act", act, "the MLP layers implement SiLU only")
    if cfg.get("mlp_bias"):
        _refuse("mlp_bias", True, "the MLP projections have no bias")
    # Qwen2/Qwen3 write a window with a switch (`use_sliding_window`), Mistral a window alone. A window as
    # long as the context never applies; any shorter one would change attention past it.
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window"):
        _refuse("use_sliding_window", True, "sliding-window attention is not implemented")
    if "use_sliding_window" not in cfg and window is not None and window < cfg["max_position_embeddings"]:
        _refuse("sliding_window", window, "sliding-window attention is not implemented")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            _refuse(key, cfg[key], "logit soft-capping is not implemented")


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 writes `rope_parameters` (theta included); older checkpoints (the real Qwen2.5 and Llama
    # 3.1 ones) a top-level `rope_theta` and maybe `rope_scaling`.
    params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse("partial_rotary_factor", partial, "rotary embedding covers whole heads only")
    unknown = set(params) - set(_ROPE_FIELDS) - _ROPE_IGNORED
    if unknown:
        _refuse("rope_scaling", sorted(unknown), "unknown rotary settings")
    kind = params.get("rope_type", params.get("type", "default"))
    settings = {_ROPE_FIELDS[k]: v for k, v in params.items() if k in _ROPE_FIELDS and v is not None}
    if kind in ("llama3", "yarn") and "original_max_position" not in settings:
        original = cfg.get("original_max_position_embeddings")
        if original is None and kind == "llama3":
            _refuse("rope_scaling", kind, "llama3 scaling needs original_max_position_embeddings")
        if original is not None:
            settings["original_max_position"] = original
    try:
        return theta, RopeScaling(kind=kind, **settings)
    except NotImplementedError as e:
        raise UnsupportedConfig(f"config.json: {e}") from None


def _eos_ids(gen: dict[str, Any], cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)
