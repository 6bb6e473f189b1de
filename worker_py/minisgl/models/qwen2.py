"""Qwen2 (the Qwen2.5 family): Llama's layers with a bias on q, k and v."""

from __future__ import annotations

from torch import nn

from minisgl.layers import GatedMLP, LayerOptions
from minisgl.models.config import ModelConfig
from minisgl.models.llama import DecoderLayer, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, options)
        return DecoderLayer(config, layer, self.rotary, options, mlp, qkv_bias=True)
