"""Attention through our Triton kernels, neither of which plans anything on the host: decode steps through
`kernels/decode_attention.py`, extend steps through `kernels/extend_attention.py`. Each kernel reads the page
tables and lengths where the uploader put them (for a graph, at fixed offsets of its device buffer, so a
captured launch finds each new step's tables). The decode kernel splits the KV scan a fixed number of ways
per graph size; the extend kernel's programs find their request and block on the device, and share each
block's keys a number of ways chosen from the token count (a graph's own). Paired with
FlashInfer's prefill (the default on CUDA), it runs the decode steps and the graphs; `--attention triton`
runs every step through it, with no FlashInfer at all: on an H100 its eager extend steps took as long as
FlashInfer's (host-bound, ~12 ms up to 2,048 tokens) and 8% longer at 8,192 tokens (docs/benchmarks.md,
2026-12-07)."""

from __future__ import annotations

import torch

from minisgl.attention.base import AttentionBackend, AttentionConfig
from minisgl.kernels import decode_attention, extend_attention
from minisgl.worker.batch import ForwardBatch
from minisgl.worker.kv_cache import KVCache

# The context a token-row graph's split count is chosen for: its rows are mostly a prompt's own tokens, so
# one split each once the rows fill the GPU (splitting 512 rows of 32 tokens eight ways took 21 us a layer).
TOKEN_CONTEXT_HINT = 512


class TritonBackend(AttentionBackend):
    graphs = True
    extend_graphs = True
    short_graphs = True
    devices = ("cuda",)

    def __init__(self, config: AttentionConfig, kv_cache: KVCache) -> None:
        super().__init__(config, kv_cache)
        device = kv_cache.k(0).device
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._kv = [(kv_cache.k(i), kv_cache.v(i)) for i in range(kv_cache.shape.num_layers)]
        # (rows, the context planned for) -> (num_splits, min_split_tokens) of each captured size
        self._graph_splits: dict[tuple[int, int], tuple[int, int]] = {}
        # (num_splits, min_split_tokens) of a planned decode step; None for an extend step
        self._splits: tuple[int, int] | None = None

    def plan(self, batch: ForwardBatch) -> None:
        if batch.is_decode:  # one new token per request: the decode kernel, split by the step's lengths
            self._set(batch, self._split_plan(batch.num_reqs, batch.max_seq_len))
        else:
            self.plan_extend_graph(batch)

    def prepare_graphs(
        self, sizes: list[int], max_kv_indices: int, token_sizes: list[int] = (), short_sizes: list[int] = ()
    ) -> None:
        planned = [(b, self.config.graph_context) for b in sizes]
        planned += [(b, TOKEN_CONTEXT_HINT) for b in token_sizes]
        planned += [(b, self.config.short_graph_context) for b in short_sizes]
        self._graph_splits = {(b, context): self._split_plan(b, context) for b, context in planned}

    def plan_graph(
        self, batch: ForwardBatch, rows: int, token_rows: bool = False, short: bool = False
    ) -> None:
        c = self.config
        context = TOKEN_CONTEXT_HINT if token_rows else c.short_graph_context if short else c.graph_context
        self._set(batch, self._graph_splits[rows, context])

    def plan_extend_graph(self, batch: ForwardBatch) -> None:
        self._planned_batch, self._splits = batch, None

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        # The step's arrays are read here, not in the plan: a graph's replay plans but never attends.
        k, v, b = *self._kv[layer], self._planned_batch
        if self._splits is None:
            # From the token count alone: in a graph, the count it was captured at.
            splits = extend_attention.splits_for(q.shape[0], q.shape[1], k.shape[2], self._num_sms)
            return extend_attention.extend_attention(
                q, k, v, b.qo_indptr, b.kv_indptr, b.kv_indices, b.seq_len, num_splits=splits
            )
        splits, min_tokens = self._splits
        return decode_attention.decode_attention(
            q, k, v, b.kv_indptr, b.kv_indices, b.seq_len, num_splits=splits, min_split_tokens=min_tokens
        )

    def _split_plan(self, rows: int, max_seq_len: int) -> tuple[int, int]:
        return decode_attention.split_plan(rows, max_seq_len, self._num_sms, self.config.num_kv_heads)

    def _set(self, batch: ForwardBatch, splits: tuple[int, int]) -> None:
        self._planned_batch, self._splits = batch, splits
