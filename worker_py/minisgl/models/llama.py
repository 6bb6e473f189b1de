"""Llama (2, 3, 3.1, 3.2; SmolLM2) and Mistral: the plain decoder layer, which the Qwen families extend.

Pre-norm attention then pre-norm gated MLP, each added to the residual; each add happens inside the norm
after it (see `RMSNorm`), and at a few rows that norm runs inside the projection before it (`then_norm`):
a layer hands the next one its input already normalised.
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
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        next_norm: RMSNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`h` is this layer's input already normalised (`input_layernorm`), `residual` the stream it was
        normalised from; returns the same for what comes next, normalised by `next_norm`."""
        h, residual = self.self_attn.then_norm(h, positions, attn, self.post_attention_layernorm, residual)
        return self.mlp.then_norm(h, next_norm, residual)


class LlamaForCausalLM(CausalLM):
    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, options)
        bias = bool(config.hf.get("attention_bias", False))
        return DecoderLayer(config, layer, self.rotary, options, mlp, qkv_bias=bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layers; a sliding window shorter than the context is refused by ModelConfig."""
