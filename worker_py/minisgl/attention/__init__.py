"""Attention backends: paged causal attention over the KV cache, one backend for extend steps and one for
decode steps, chosen by name (`registry.py`; the contract is `base.py`). Importing this package costs
nothing: the backends load when created."""

from __future__ import annotations

from minisgl.attention.registry import BACKENDS, DECODE_CHOICES, PREFILL_CHOICES, resolve


def create_backend(prefill: str, decode: str, config, kv_cache):
    """The backend for resolved names (`resolve`): one object when both are the same backend, else a
    `PairedBackend` of the two."""
    from minisgl.attention.base import PairedBackend

    first = BACKENDS[prefill].load()(config, kv_cache)
    if decode == prefill:
        return first
    return PairedBackend(first, BACKENDS[decode].load()(config, kv_cache))


__all__ = ["BACKENDS", "DECODE_CHOICES", "PREFILL_CHOICES", "create_backend", "resolve"]
