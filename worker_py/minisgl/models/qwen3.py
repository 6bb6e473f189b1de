"""Qwen3: Llama's layers with an RMSNorm over each q and k head before the rotary embedding."""

from __future__ import annotations

from torch import nn

from minisgl.layers import GatedMLP, LayerOptions
from minisgl.models.config import ModelConfig
from minisgl.models.llama import DecoderLayer, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, options)
        bias = bool(config.hf.get("attention_bias", False))
        return DecoderLayer(config, layer, self.rotary, options, mlp, qkv_bias=bias, qk_norm=True)
