"""What every decoder-only family shares: embed the tokens, run the decoder layers with the residual carried
beside the hidden states, a final norm, the LM head; and the mapping from checkpoint names to parameters.

A family subclasses `CausalLM` with `make_layer` (its decoder layer, composed of `minisgl.layers`) and, if
its checkpoints name things differently, `checkpoint_target`. Tokens of all requests are packed along one
axis ([t, hidden]); attention is the only place where requests are told apart, through the backend's plan.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from minisgl.attention.base import AttentionBackend
from minisgl.layers import LayerOptions, LMHead, RMSNorm, RotaryEmbedding, StepTokens, VocabEmbedding
from minisgl.layers.loading import ALL
from minisgl.models.config import ModelConfig

# Checkpoint tensors that are rows of one merged parameter here: (name part, parameter part, shard).
MERGED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", "gate"),
    (".up_proj.", ".gate_up_proj.", "up"),
)


class DecoderStack(nn.Module):
    def __init__(self, layers: list[nn.Module], config: ModelConfig, options: LayerOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, options)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options)


class CausalLM(nn.Module):
    """Build under `torch.device("meta")` and materialise with `to_empty`; see `minisgl.models.load_model`.
    Parameter names are the checkpoint's (`model.layers.3.self_attn.qkv_proj.weight`, ...)."""

    def __init__(self, config: ModelConfig, options: LayerOptions, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            options.dtype,
            device,
        )
        layers = [self.make_layer(config, i, options) for i in range(config.num_layers)]
        self.model = DecoderStack(layers, config, options)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, options, tied=tied)

    def make_layer(self, config: ModelConfig, layer: int, options: LayerOptions) -> nn.Module:
        """Decoder layer `layer`: `forward(x, residual, positions, attn) -> (x, residual)`."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        step: StepTokens | None = None,
    ) -> torch.Tensor:
        """Final hidden states of every new token: [t, hidden]. With `step` the ids name slots' last tokens
        too, and are recorded beside their K/V (`StepTokens`)."""
        x, residual = self.model.embed_tokens(input_ids, step), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, attn)
        return self.model.norm(x, residual)[0]

    @property
    def capturable(self) -> bool:
        """Whether a forward may be captured in a CUDA graph (no layer reads the device from the host)."""
        return all(getattr(m, "capturable", True) for m in self.modules() if m is not self)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def checkpoint_target(self, name: str) -> tuple[str, Hashable] | None:
        """The parameter a checkpoint tensor loads into and which shard of it, or None to skip it."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        for part, merged, shard in MERGED:
            if part in name:
                return name.replace(part, merged), shard
        return name, ALL
