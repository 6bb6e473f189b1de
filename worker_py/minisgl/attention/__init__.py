"""Attention backends: paged causal attention over the KV cache, chosen by name."""

from __future__ import annotations

from minisgl.attention.base import AttentionBackend, AttentionConfig
from minisgl.attention.torch_ref import TorchRefBackend
from minisgl.worker.kv_cache import KVCache

# A FlashInfer backend registers here under "flashinfer" (plan() on its wrappers, forward() on run()).
_BACKENDS: dict[str, type[AttentionBackend]] = {
    "torch": TorchRefBackend,
}


def create_backend(name: str, config: AttentionConfig, kv_cache: KVCache) -> AttentionBackend:
    try:
        cls = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}") from None
    return cls(config, kv_cache)


__all__ = ["AttentionBackend", "AttentionConfig", "TorchRefBackend", "create_backend"]
