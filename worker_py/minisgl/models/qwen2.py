"""Qwen2 (the Qwen2.5 family) for paged, batched serving.

Tokens of all requests are packed along one axis ([t, hidden]); attention is the only place where requests are
told apart, through the backend's per-step plan. q/k/v and gate/up are each one merged matmul.

`set_fused(True)` switches to the kernels of `fused.py` (CUDA, and an attention backend with `attend`
and `out_loc`): the residual then travels beside the hidden states so that each add joins the next norm.
`set_fused(True, small_m=True)` also runs the projections of batches of at most 16 tokens through
`small_m` where it measured faster (`small_m.TILES`), folding a norm into the projection after it when that
projection is one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.attention.base import AttentionBackend
from minisgl.models import fused as kernels
from minisgl.models import small_m
from minisgl.models.config import ModelConfig
from minisgl.models.norm import RMSNorm
from minisgl.models.rotary import RotaryEmbedding


def project(x: torch.Tensor, linear: nn.Linear, small: bool, silu_mul: bool = False) -> torch.Tensor:
    """`linear(x)` (then SiLU-and-mul over its [gate; up] halves), through `small_m` for a few rows."""
    if small and small_m.suits(x, linear.weight, silu_mul):
        return small_m.linear(x, linear.weight, linear.bias, silu_mul=silu_mul)
    out = linear(x)
    return kernels.silu_and_mul(out) if silu_mul else out


class Qwen2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=True, dtype=dtype)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False, dtype=dtype)
        self.rotary = rotary
        self.fused = False
        self.small_m = False

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        if self.fused:
            return self.attend_fused(project(x, self.qkv_proj, self.small_m), positions, attn)
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = attn.forward(self.layer, q, k, v)
        return self.o_proj(out.reshape(-1, self.q_size))

    def attend_fused(
        self, qkv: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """The rest of the fused forward, from the merged projection's output."""
        kv = attn.kv_cache
        q = kernels.rope_store_kv(
            qkv,
            positions,
            self.rotary.cos,
            self.rotary.sin,
            attn.out_loc,
            kv.flat_k(self.layer),
            kv.flat_v(self.layer),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        return project(attn.attend(self.layer, q).reshape(-1, self.q_size), self.o_proj, self.small_m)


class Qwen2MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=False, dtype=dtype
        )
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, dtype=dtype)
        self.fused = False
        self.small_m = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            h = project(x, self.gate_up_proj, self.small_m, silu_mul=True)
            return project(h, self.down_proj, self.small_m)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Qwen2Attention(config, layer, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = Qwen2MLP(config, dtype)
        self.fused = False
        self.small_m = False

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eager: (hidden states, None). Fused: x + residual is the hidden state, and comes back split the
        same way, so that the adds happen inside the next norm's kernel."""
        if not self.fused:
            x = x + self.self_attn(self.input_layernorm(x), positions, attn)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if (
            self.small_m
            and small_m.suits(x, self.self_attn.qkv_proj.weight)
            and small_m.suits(x, self.mlp.gate_up_proj.weight, silu_mul=True)
        ):
            # Both norms run inside the next projection's kernel.
            qkv_proj, gate_up = self.self_attn.qkv_proj, self.mlp.gate_up_proj
            qkv, residual = small_m.norm_linear(
                x, residual, ln1.weight, ln1.eps, qkv_proj.weight, qkv_proj.bias
            )
            a = self.self_attn.attend_fused(qkv, positions, attn)
            h, residual = small_m.norm_linear(a, residual, ln2.weight, ln2.eps, gate_up.weight, silu_mul=True)
            return project(h, self.mlp.down_proj, True), residual
        if residual is None:
            h, residual = kernels.rms_norm(x, ln1.weight, ln1.eps), x
        else:
            h, residual = kernels.add_rms_norm(x, residual, ln1.weight, ln1.eps)
        h, residual = kernels.add_rms_norm(self.self_attn(h, positions, attn), residual, ln2.weight, ln2.eps)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, i, rotary, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, positions, attn, residual)
        if residual is None:
            return self.norm(x)
        return kernels.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]


class Qwen2ForCausalLM(nn.Module):
    """Build under `torch.device("meta")` and materialise with `to_empty`; see `minisgl.models.load_model`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, dtype, device
        )
        self.model = Qwen2Model(config, rotary, dtype)
        self.small_m = False
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """Final hidden states of every new token: [t, hidden]."""
        return self.model(input_ids, positions, attn)

    def set_fused(self, on: bool, small_m: bool = False) -> None:
        for module in self.modules():
            if hasattr(module, "fused"):
                module.fused = on
            if hasattr(module, "small_m"):
                module.small_m = on and small_m

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.small_m and small_m.suits(hidden, weight):
            return small_m.linear(hidden, weight)
        return F.linear(hidden, weight)

    def checkpoint_target(self, name: str) -> tuple[str, int, int] | None:
        """Where a checkpoint tensor goes: (parameter name, first row, rows), rows -1 for the whole parameter.

        None means the tensor is deliberately ignored.
        """
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name == "lm_head.weight" and self.lm_head is None:
            return None
        cfg = self.config
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        shards = {
            "self_attn.q_proj.": ("self_attn.qkv_proj.", 0, q),
            "self_attn.k_proj.": ("self_attn.qkv_proj.", q, kv),
            "self_attn.v_proj.": ("self_attn.qkv_proj.", q + kv, kv),
            "mlp.gate_proj.": ("mlp.gate_up_proj.", 0, inter),
            "mlp.up_proj.": ("mlp.gate_up_proj.", inter, inter),
        }
        for part, (merged, start, rows) in shards.items():
            if part in name:
                return name.replace(part, merged), start, rows
        return name, 0, -1
