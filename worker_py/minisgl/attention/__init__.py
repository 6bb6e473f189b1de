"""Attention backends: paged causal attention over the KV cache, chosen by name."""

from __future__ import annotations

import importlib.util

import torch

from minisgl.attention.base import AttentionBackend, AttentionConfig
from minisgl.attention.flashinfer import FlashInferBackend  # imports flashinfer only when constructed
from minisgl.attention.torch_ref import TorchRefBackend
from minisgl.worker.kv_cache import KVCache

BACKENDS = ("torch", "flashinfer")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """`auto` is flashinfer on CUDA when the package is importable, torch otherwise; other names pass."""
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return "flashinfer" if on_cuda and importlib.util.find_spec("flashinfer") is not None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return name


def create_backend(
    name: str, config: AttentionConfig, kv_cache: KVCache, decode_kernel: str = "flashinfer"
) -> AttentionBackend:
    """`decode_kernel` (flashinfer or triton) picks the flashinfer backend's decode kernel."""
    name = resolve_backend(name, kv_cache.k(0).device)
    if name == "flashinfer":
        return FlashInferBackend(config, kv_cache, decode_kernel)
    return TorchRefBackend(config, kv_cache)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionConfig",
    "TorchRefBackend",
    "create_backend",
    "resolve_backend",
]
