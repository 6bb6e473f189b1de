"""The GGUF architectures we convert, one table each: which metadata key becomes which HF config field, and
which GGUF tensor becomes which HF tensor (with its shape, and what must be undone to it).

GGUF names tensors `token_embd`, `output_norm`, `output` and, per layer N, `blk.N.<part>.weight|bias`; the
tables map the parts. Shapes are written the HF (row-major) way, in dimensions named by `dims()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minisgl.checkpoint.gguf_meta import CheckpointError, float32_value, optional_field, tensor_names
from minisgl.checkpoint.gguf_rope import rope_scaling


@dataclass(frozen=True)
class Meta:
    """A config field read from metadata key `{arch}.{key}`; `default` (a function of the fields before it)
    stands in when the key is absent, and without one the key is required."""

    key: str
    kind: Callable[[Any], Any] = int
    default: Callable[[dict], Any] | None = None


@dataclass(frozen=True)
class Weight:
    """Where one per-layer GGUF tensor goes. `hf` is under `model.layers.N.`; `{expert}` in it means the GGUF
    tensor stacks every expert along its first dimension and is split into one HF tensor per expert."""

    hf: str
    shape: tuple[str, ...]
    # A config field that must be true for the tensor to exist (and then it must); None: always there.
    when: str | None = None
    # llama.cpp's llama converter reorders each head's rows so that rotary pairs sit side by side (its rotary
    # layout); HF keeps the two halves of a head apart. The config field counting this tensor's heads.
    rotary_heads: str | None = None

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf


def literal(value):
    return lambda config, reader: value


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    model_type: str
    # Config fields from metadata, in the order config.json lists them (after architectures, model_type and
    # hidden_act; before vocab_size, tie_word_embeddings, torch_dtype and the token ids).
    metadata: dict[str, Meta]
    layer: dict[str, Weight]
    # Config fields after those, computed from (config so far, GGUF reader).
    extra: dict[str, Callable[[dict, Any], Any]] = field(default_factory=dict)
    # generation_config.json's sampling defaults: the GGUF does not carry them; the family's upstream's.
    sampling: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Building blocks


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def dims(config: dict) -> dict[str, int]:
    d = head_dim(config)
    return {
        "hidden": config["hidden_size"],
        "ffn": config["intermediate_size"],
        "vocab": config["vocab_size"],
        "head_dim": d,
        "q": config["num_attention_heads"] * d,
        "kv": config["num_key_value_heads"] * d,
        "experts": config.get("num_experts", 0),
        "expert_ffn": config.get("moe_intermediate_size", 0),
    }


TRANSFORMER = {
    "hidden_size": Meta("embedding_length"),
    "intermediate_size": Meta("feed_forward_length"),
    "num_hidden_layers": Meta("block_count"),
    "num_attention_heads": Meta("attention.head_count"),
    "num_key_value_heads": Meta("attention.head_count_kv"),
}
# Written when a head is not hidden / heads wide (Qwen3); absent, it is that, as llama.cpp reads it.
HEAD_DIM = {"head_dim": Meta("attention.key_length", default=head_dim)}
CONTEXT = {
    "max_position_embeddings": Meta("context_length"),
    "rope_theta": Meta("rope.freq_base", float32_value),
    "rms_norm_eps": Meta("attention.layer_norm_rms_epsilon", float32_value),
}

ATTENTION = {
    "attn_norm.weight": Weight("input_layernorm.weight", ("hidden",)),
    "ffn_norm.weight": Weight("post_attention_layernorm.weight", ("hidden",)),
    "attn_q.weight": Weight("self_attn.q_proj.weight", ("q", "hidden")),
    "attn_k.weight": Weight("self_attn.k_proj.weight", ("kv", "hidden")),
    "attn_v.weight": Weight("self_attn.v_proj.weight", ("kv", "hidden")),
    "attn_output.weight": Weight("self_attn.o_proj.weight", ("hidden", "q")),
}
QKV_BIAS = {
    "attn_q.bias": Weight("self_attn.q_proj.bias", ("q",)),
    "attn_k.bias": Weight("self_attn.k_proj.bias", ("kv",)),
    "attn_v.bias": Weight("self_attn.v_proj.bias", ("kv",)),
}
QK_NORM = {
    "attn_q_norm.weight": Weight("self_attn.q_norm.weight", ("head_dim",)),
    "attn_k_norm.weight": Weight("self_attn.k_norm.weight", ("head_dim",)),
}
DENSE_MLP = {
    "ffn_gate.weight": Weight("mlp.gate_proj.weight", ("ffn", "hidden")),
    "ffn_up.weight": Weight("mlp.up_proj.weight", ("ffn", "hidden")),
    "ffn_down.weight": Weight("mlp.down_proj.weight", ("hidden", "ffn")),
}
EXPERT_MLP = {
    "ffn_gate_inp.weight": Weight("mlp.gate.weight", ("experts", "hidden")),
    "ffn_gate_exps.weight": Weight(
        "mlp.experts.{expert}.gate_proj.weight", ("experts", "expert_ffn", "hidden")
    ),
    "ffn_up_exps.weight": Weight("mlp.experts.{expert}.up_proj.weight", ("experts", "expert_ffn", "hidden")),
    "ffn_down_exps.weight": Weight(
        "mlp.experts.{expert}.down_proj.weight", ("experts", "hidden", "expert_ffn")
    ),
}

# Llama may carry biases on all four projections (HF's attention_bias); llama.cpp permuted q's and k's rows.
LLAMA_ATTENTION = ATTENTION | {
    "attn_q.weight": Weight("self_attn.q_proj.weight", ("q", "hidden"), rotary_heads="num_attention_heads"),
    "attn_k.weight": Weight("self_attn.k_proj.weight", ("kv", "hidden"), rotary_heads="num_key_value_heads"),
    "attn_q.bias": Weight("self_attn.q_proj.bias", ("q",), "attention_bias", "num_attention_heads"),
    "attn_k.bias": Weight("self_attn.k_proj.bias", ("kv",), "attention_bias", "num_key_value_heads"),
    "attn_v.bias": Weight("self_attn.v_proj.bias", ("kv",), "attention_bias"),
    "attn_output.bias": Weight("self_attn.o_proj.bias", ("hidden",), "attention_bias"),
}


def has_layer_tensor(name: str) -> Callable[[dict, Any], bool]:
    return lambda config, reader: f"blk.0.{name}" in tensor_names(reader)


def rope(arch: str) -> Callable[[dict, Any], dict | None]:
    return lambda config, reader: rope_scaling(reader, arch, config)


QWEN3_EXTRA = {
    "attention_bias": literal(False),
    "use_sliding_window": literal(False),
    "sliding_window": literal(None),
    "max_window_layers": lambda config, reader: config["num_hidden_layers"],
    "attention_dropout": literal(0.0),
    "initializer_range": literal(0.02),
    "use_cache": literal(True),
}
# Upstream Qwen3's published sampling defaults (thinking mode).
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}

# ----------------------------------------------------------------------------------------------------
# The tables

ARCHITECTURES: dict[str, Architecture] = {
    # The default model's family. Its config.json is byte-for-byte what the first converter wrote.
    "qwen2": Architecture(
        hf_class="Qwen2ForCausalLM",
        model_type="qwen2",
        metadata=TRANSFORMER | CONTEXT,
        layer=ATTENTION | QKV_BIAS | DENSE_MLP,
        extra={
            "use_sliding_window": literal(False),
            "sliding_window": literal(None),
            "max_window_layers": lambda config, reader: config["num_hidden_layers"],
            "attention_dropout": literal(0.0),
            "initializer_range": literal(0.02),
            "use_cache": literal(True),
        },
        # Upstream Qwen2.5(-Coder)-Instruct's sampling defaults.
        sampling={
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.1,
        },
    ),
    "llama": Architecture(
        hf_class="LlamaForCausalLM",
        model_type="llama",
        metadata=TRANSFORMER | HEAD_DIM | CONTEXT,
        layer=LLAMA_ATTENTION | DENSE_MLP,
        extra={
            "attention_bias": has_layer_tensor("attn_q.bias"),
            "mlp_bias": literal(False),
            "rope_scaling": rope("llama"),
            "attention_dropout": literal(0.0),
            "initializer_range": literal(0.02),
            "use_cache": literal(True),
        },
    ),
    "qwen3": Architecture(
        hf_class="Qwen3ForCausalLM",
        model_type="qwen3",
        metadata=TRANSFORMER | HEAD_DIM | CONTEXT,
        layer=ATTENTION | QK_NORM | DENSE_MLP,
        extra={"rope_scaling": rope("qwen3")} | QWEN3_EXTRA,
        sampling=QWEN3_SAMPLING,
    ),
    "qwen3moe": Architecture(
        hf_class="Qwen3MoeForCausalLM",
        model_type="qwen3_moe",
        metadata={
            "hidden_size": TRANSFORMER["hidden_size"],
            "num_experts": Meta("expert_count"),
            "num_experts_per_tok": Meta("expert_used_count"),
            "moe_intermediate_size": Meta("expert_feed_forward_length"),
            # Used only by dense layers, which these checkpoints do not have.
            "intermediate_size": Meta("feed_forward_length", default=lambda c: c["moe_intermediate_size"]),
            # Every Qwen3-MoE release renormalizes its top-k routing weights.
            "norm_topk_prob": Meta("expert_weights_norm", bool, default=lambda c: True),
        }
        | {k: v for k, v in TRANSFORMER.items() if k not in ("hidden_size", "intermediate_size")}
        | HEAD_DIM
        | CONTEXT,
        layer=ATTENTION | QK_NORM | EXPERT_MLP,
        extra={
            "decoder_sparse_step": literal(1),
            "mlp_only_layers": literal([]),
            "rope_scaling": rope("qwen3moe"),
        }
        | QWEN3_EXTRA,
        sampling=QWEN3_SAMPLING,
    ),
}


def architecture_of(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"GGUF architecture {name!r} is not supported (supported: {known})")
    return ARCHITECTURES[name]


# ----------------------------------------------------------------------------------------------------
# config.json and generation_config.json


def build_config(reader, arch: str, vocab_size: int, tied: bool) -> dict:
    table = architecture_of(arch)
    config: dict[str, Any] = {
        "architectures": [table.hf_class],
        "model_type": table.model_type,
        "hidden_act": "silu",
    }
    for name, meta in table.metadata.items():
        value = optional_field(reader, f"{arch}.{meta.key}")
        if value is not None:
            config[name] = meta.kind(value)
        elif meta.default is not None:
            config[name] = meta.default(config)
        else:
            raise CheckpointError(f"the GGUF has no {arch}.{meta.key!r} metadata")
    bos = optional_field(reader, "tokenizer.ggml.bos_token_id")
    config |= {
        # The embedding keeps every row, padding past the tokenizer's last token included, as upstream does.
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": int(optional_field(reader, "tokenizer.ggml.eos_token_id", -1)),
    }
    if config["eos_token_id"] < 0:
        raise CheckpointError("the GGUF has no 'tokenizer.ggml.eos_token_id' metadata")
    for name, compute in table.extra.items():
        config[name] = compute(config, reader)
    return config


def build_generation_config(arch: str, config: dict, pad_id: int | None, stop_ids: list[int]) -> dict:
    generation = {"bos_token_id": config["bos_token_id"]}
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    return generation | {"eos_token_id": stop_ids, **architecture_of(arch).sampling}
