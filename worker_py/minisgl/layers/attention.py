"""Self-attention over the paged KV cache: the merged q/k/v projection, an optional per-head q/k RMSNorm
(Qwen3), rotary embedding with the write of this step's K/V, the attention backend, the output projection.
With tensor parallelism each rank holds a slice of the heads (q/k/v column-, o row-parallel); KV heads fewer
than the ranks are replicated, one per rank (`minisgl.tp`), and the rank's KV cache holds only its own."""

from __future__ import annotations

import torch
from torch import nn

from minisgl import tp
from minisgl.attention.base import AttentionBackend
from minisgl.kernels import rope, small_m
from minisgl.layers.linear import Linear
from minisgl.layers.norm import RMSNorm
from minisgl.layers.options import LayerOptions
from minisgl.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(
        self,
        layer: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        options: LayerOptions,
        *,
        qkv_bias: bool = False,
        qk_norm_eps: float | None = None,
    ) -> None:
        """`qk_norm_eps` adds the q/k norms (checkpoint names `q_norm`, `k_norm`)."""
        super().__init__()
        self.layer = layer
        self.num_heads = options.split(num_heads, "attention heads")
        kv_part = tp.kv_part(num_kv_heads, options.tp_size, options.tp_rank)
        if num_kv_heads < options.tp_size and options.tp_size % num_kv_heads:
            raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {options.tp_size} ranks")
        self.num_kv_heads = tp.local_kv_heads(num_kv_heads, options.tp_size)
        if num_kv_heads >= options.tp_size:
            options.split(num_kv_heads, "KV heads")
        self.head_dim = head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv_proj = Linear(
            hidden_size,
            [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
            options,
            bias=qkv_bias,
            tp_dim=0,
            shards=("q", "k", "v"),
            parts=[(options.tp_rank, options.tp_size), kv_part, kv_part],
        )
        self.o_proj = Linear(num_heads * head_dim, hidden_size, options, tp_dim=1)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, options)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, options)
        self.rotary = rotary
        self.fused = options.fused

    def forward(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """The layer's output for its normalised input `h`."""
        return self.o_proj(self._attend(h, positions, attn))

    def _attend(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """Everything before o: q/k/v, RoPE with the KV write, attention. At a few rows one kernel does the
        first three (`small_m.qkv_rope`)."""
        qkv = self.qkv_proj
        if qkv.small_m and self.q_norm is None and small_m.suits(h, qkv.weight, small_m.ROPE):
            q = small_m.qkv_rope(h, qkv.weight, qkv.bias, self._rope_store_at(positions, attn))
        elif self.fused:
            q = self._rope_store_fused(qkv(h), positions, attn)
        else:
            q = self._rope_store(qkv(h), positions, attn)
        return attn.attend(self.layer, q).reshape(-1, self.q_size)

    def _rope_store(self, qkv: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm.normalize(q), self.k_norm.normalize(k)
        q, k = rope.rope_reference(positions, q, k, self.rotary.cos, self.rotary.sin)
        attn.kv_cache.store(self.layer, k, v, attn.out_loc)
        return q

    def _rope_store_fused(
        self, qkv: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        qk_norm = None
        if self.q_norm is not None:
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        return rope.rope_store_kv(qkv, *self._rope_store_at(positions, attn), qk_norm)

    def _rope_store_at(self, positions: torch.Tensor, attn: AttentionBackend) -> rope.RopeStore:
        kv = attn.kv_cache
        return rope.RopeStore(
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
