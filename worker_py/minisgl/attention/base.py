"""The attention backend contract: everything the model and the runner call, and what the runner may ask.

Per step the runner calls `plan(batch)` once (eagerly), or `plan_graph(batch, rows)` or
`plan_extend_graph(batch)` (before a CUDA graph's replay). Then each attention layer writes its new K/V into
`kv_cache` at `out_loc` (itself, or fused with the rotary embedding) and calls `attend(layer, q)`: every new
token attends to its request's cached prefix and to the new tokens up to and including itself.

Capabilities are class attributes that the runner reads; it never asks for a backend by name:
- `prefill` / `decode`: the kinds of step it runs (a registry entry may pair two backends, one each);
- `graphs`: its decode steps may be captured in CUDA graphs (`prepare_graphs`, then `plan_graph`), and
  perhaps its extend steps (`plan_extend_graph`);
- `devices`: the device types it runs on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from minisgl.attention.registry import DEFAULT_GRAPH_CONTEXT
from minisgl.worker.batch import ForwardBatch
from minisgl.worker.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionConfig:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    # The context a decode graph's attention is planned for: the Triton kernel splits longer ones into more
    # shares (`decode_attention.split_plan`); others ignore it.
    graph_context: int = DEFAULT_GRAPH_CONTEXT
    # The same for the decode graphs' short-context twins (0: none are captured).
    short_graph_context: int = 0

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


class AttentionBackend(ABC):
    prefill: ClassVar[bool] = True
    decode: ClassVar[bool] = True
    graphs: ClassVar[bool] = False
    # Its decode graphs' plan depends on the context they are planned for (`AttentionConfig`), so that a twin
    # planned for short contexts can differ: `prepare_graphs(short_sizes=...)`, `plan_graph(short=True)`.
    short_graphs: ClassVar[bool] = False
    extend_graphs: ClassVar[bool] = False  # `plan_extend_graph` exists
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    def __init__(self, config: AttentionConfig, kv_cache: KVCache) -> None:
        if kv_cache.page_size != config.page_size:
            raise ValueError("the KV cache and the attention backend disagree on the page size")
        device = kv_cache.k(0).device
        if device.type not in self.devices:
            raise RuntimeError(
                f"the {type(self).__name__} runs on {', '.join(self.devices)}, not on {device}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self._planned_batch: ForwardBatch | None = None  # the step the last plan was for; set by every plan

    @property
    def out_loc(self) -> torch.Tensor | None:
        """Where this step's K/V go: the planned step's, cut out of its upload when a layer first asks (a
        graph replay never does)."""
        return None if self._planned_batch is None else self._planned_batch.out_loc

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Turns the step's page tables into what the kernels need; sets `_planned_batch`."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q: [t, Hq, D] of this step's new tokens, whose K/V are in the cache already. -> [t, Hq, D]."""

    def prepare_graphs(
        self, sizes: list[int], max_kv_indices: int, token_sizes: list[int] = (), short_sizes: list[int] = ()
    ) -> None:
        """Sets up whatever a captured decode batch of each size reads from fixed addresses; `token_sizes`
        are the sizes of the graphs that run extend steps as one row per token (token_rows.py), and
        `short_sizes` those of the decode graphs' twins for short contexts (`short_graphs` backends only)."""
        raise NotImplementedError(f"{type(self).__name__} does not run inside CUDA graphs")

    def plan_graph(
        self, batch: ForwardBatch, rows: int, token_rows: bool = False, short: bool = False
    ) -> None:
        """`plan` for a decode batch padded to `rows`, for the graph captured at that size (of the token-row
        graphs with `token_rows`, of the short-context twins with `short`)."""
        raise NotImplementedError(f"{type(self).__name__} does not run inside CUDA graphs")

    def plan_extend_graph(self, batch: ForwardBatch) -> None:
        """`plan` for an extend step padded to a graph's token and request counts (`ExtendPadding`): its
        padding tokens belong to no request and its padding requests have no tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not run extend steps inside CUDA graphs")


class PairedBackend(AttentionBackend):
    """One backend for extend steps and another for decode steps (FlashInfer's prefill with our Triton
    decode, say): each plan goes to the one whose kind of step it is, and `attend` follows it."""

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        super().__init__(prefill.config, prefill.kv_cache)
        self._prefill, self._decode = prefill, decode
        self._active = prefill
        # Instance attributes: they depend on the pair.
        self.graphs, self.extend_graphs, self.short_graphs = (
            decode.graphs,
            decode.extend_graphs,
            decode.short_graphs,
        )

    def plan(self, batch: ForwardBatch) -> None:
        self._active = self._decode if batch.is_decode else self._prefill
        self._active.plan(batch)

    @property
    def out_loc(self) -> torch.Tensor | None:
        return self._active.out_loc

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self._active.attend(layer, q)

    def prepare_graphs(
        self, sizes: list[int], max_kv_indices: int, token_sizes: list[int] = (), short_sizes: list[int] = ()
    ) -> None:
        self._decode.prepare_graphs(sizes, max_kv_indices, token_sizes, short_sizes)

    def plan_graph(
        self, batch: ForwardBatch, rows: int, token_rows: bool = False, short: bool = False
    ) -> None:
        self._active = self._decode
        self._decode.plan_graph(batch, rows, token_rows, short)

    def plan_extend_graph(self, batch: ForwardBatch) -> None:
        # The graph-capable one of the pair runs the captured extend steps too.
        self._active = self._decode
        self._decode.plan_extend_graph(batch)
