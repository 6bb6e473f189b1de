"""Llama (2, 3, 3.1, 3.2; SmolLM2) and Mistral: the plain decoder layer, which the Qwen families extend.

Pre-norm attention then pre-norm gated MLP, each added to the residual; the adds happen inside the next
norm (see `RMSNorm`).
Options a family turns on: a bias on q/k/v (Qwen2), q/k norms (Qwen3), another MLP (Qwen3-MoE's experts).
"""

from __future__ import annotations

import torch
from torch import nn

from minisgl.attention.base import AttentionBackend
from minisgl.layers import Attention, GatedMLP, LayerOptions, RMSNorm, RotaryEmbedding
from minisgl.models.base import CausalLM
from minisgl.models.config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        rotary: RotaryEmbedding,
        options: LayerOptions,
        mlp: nn.Module,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, options)
        self.self_attn = Attention(
            layer,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            rotary,
            options,
            qkv_bias=qkv_bias,
            qk_norm_eps=c.rms_norm_eps if qk_norm else None,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, options)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, attn: AttentionBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, positions, attn)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, options)
        bias = bool(config.hf.get("attention_bias", False))
        return DecoderLayer(config, layer, self.rotary, options, mlp, qkv_bias=bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layers; a sliding window shorter than the context is refused by ModelConfig."""
