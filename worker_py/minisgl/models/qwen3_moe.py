"""Qwen3-MoE: Qwen3's attention, and a mixture of experts in place of the MLP in every
`decoder_sparse_step`-th layer not listed in `mlp_only_layers`."""

from __future__ import annotations

from collections.abc import Hashable

from torch import nn

from minisgl.layers import GatedMLP, LayerOptions, MoE
from minisgl.layers.moe import expert_shard
from minisgl.models.config import ModelConfig
from minisgl.models.llama import DecoderLayer
from minisgl.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        hf = config.hf
        # transformers 5 writes num_local_experts, earlier versions and the Qwen checkpoints num_experts.
        experts = hf.get("num_experts", hf.get("num_local_experts", 0))
        sparse = (
            experts > 0
            and layer not in hf.get("mlp_only_layers", [])
            and ((layer + 1) % hf.get("decoder_sparse_step", 1) == 0)
        )
        if sparse:
            mlp = MoE(
                config.hidden_size,
                hf["moe_intermediate_size"],
                experts,
                hf["num_experts_per_tok"],
                bool(hf.get("norm_topk_prob", False)),
                options,
            )
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, options)
        bias = bool(hf.get("attention_bias", False))
        return DecoderLayer(config, layer, self.rotary, options, mlp, qkv_bias=bias, qk_norm=True)

    def checkpoint_target(self, name: str) -> tuple[str, Hashable] | None:
        return expert_shard(name) or super().checkpoint_target(name)
