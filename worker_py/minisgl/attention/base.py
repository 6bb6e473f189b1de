"""The attention backend interface: plan once per step, then attend once per layer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from minisgl.worker.batch import ForwardBatch
from minisgl.worker.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


class AttentionBackend(ABC):
    """Paged causal attention over the KV cache.

    `plan` turns the step's page tables into whatever the kernels need (index tensors, kernel plans); it
    runs once per step, before the forward. `forward` runs once per layer: it stores this step's K/V at
    `out_loc`, then lets each new token attend to its request's cached prefix and to the new tokens up to and
    including itself.
    """

    def __init__(self, config: AttentionConfig, kv_cache: KVCache) -> None:
        if kv_cache.page_size != config.page_size:
            raise ValueError("the KV cache and the attention backend disagree on the page size")
        self.config = config
        self.kv_cache = kv_cache

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [t, Hq, D]; k, v: [t, Hkv, D] for this step's new tokens. Returns [t, Hq, D]."""

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, out_loc: torch.Tensor) -> None:
        self.kv_cache.flat_k(layer)[out_loc] = k
        self.kv_cache.flat_v(layer)[out_loc] = v
