"""Decode forwards captured as CUDA graphs, one per batch size, replayed for batches padded up to that size;
and the sampling after them, one graph per batch size and sampling mode.

A captured forward reads its inputs from fixed addresses: the first `3 * B` entries of the uploader's device
buffer (input ids, positions, KV locations, in that order; see batch.py), the runner's last-token table, the
KV cache, and the index buffers of the attention backend's wrapper for size B, which `plan_graph` refills
before every replay. Its output, the logits of all B rows, lives in the graphs' shared memory pool and is
overwritten by the next replay of that size, so it is consumed (sampled) before the next step is launched on
the same stream.

A sampling graph reads those logits, the request slots and sequence lengths (the next `2 * B` entries of the
device buffer: fixed too, since every array of a padded step before the indptrs has B entries) and the
sampler's per-slot parameters, and writes the sampled ids (all B rows, in the pool) and each slot's last
token. Sampling eagerly after the forward costs the host ~1 ms a step once it samples (temperature, top-k,
top-p: a few dozen small launches), more than the forward's GPU time at small batches; replayed, one launch.

Small extend steps are captured too, as decode steps of one row per new token (`token_rows.py`), at token
counts `token_sizes`. Larger extend steps may be captured as what they are, padded to a token count of
`extend_sizes` and to `extend_reqs` requests (`ExtendPadding`), when the attention backend can plan one for a
graph (`plan_extend_graph`). Only each request's last new token needs logits: both kinds stop at the hidden
states, and copy each request's last one, its slot and its length to `last_rows` (`last_rows.py`). The
"last-row" graphs, one per batch size and sampling mode, run the LM head over those rows and sample them.

With `short_context` (for a backend whose plan depends on the context: `short_graphs`), each decode graph of
at most `SHORT_MAX_ROWS` rows has a twin whose attention is planned for contexts of that many tokens (for the
Triton kernel at 128: one kernel, no split, no combine), with sampling graphs of its own; a step whose
longest context fits replays the twin.

With `launch_early` the graphs of at most `kernels.pdl.MAX_ROWS` rows launch our kernels with programmatic
dependent launch (`kernels/pdl.py`); with `prefetch_weights` small_m's programs in graphs of at most
`small_m.MAX_ROWS` rows first ask for their weight tiles into L2 (an experiment, off by default).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from minisgl.attention.base import AttentionBackend
from minisgl.kernels import pdl, small_m
from minisgl.proto.step import STEP_ARRAYS
from minisgl.sampling.params import SampleMode
from minisgl.worker.batch import BatchUploader, ForwardBatch
from minisgl.worker.last_rows import LastRows
from minisgl.worker.padding import DecodePadding, ExtendPadding, Padding, bucket_for

log = logging.getLogger("minisgl.worker")

# The kinds of graph: decode steps (logits, then perhaps sampling), their twins planned for short contexts,
# extend steps as token rows, extend steps, and the sampling of the last rows these two gather.
DECODE, SHORT, TOKEN_ROWS, EXTEND, LAST_ROWS = "decode", "short-decode", "token-row", "extend", "last-row"
# The decode graphs that get a short-context twin (`short_context`) are those of at most this many rows: where
# one attention kernel with no combine measured faster at short contexts (batch 1 and 16, H100, 2026-12-08).
SHORT_MAX_ROWS = 16


def _empty_decode_step() -> SimpleNamespace:
    """A decode step of no request: padded to B rows it is B padding rows, harmless to run."""
    arrays = {name: np.zeros(0, dtype=dtype) for name, dtype, _ in STEP_ARRAYS}
    for indptr in ("qo_indptr", "kv_indptr", "join_bias_indptr"):
        arrays[indptr] = np.zeros(1, dtype=np.int32)
    return SimpleNamespace(kind=1, **arrays)


class DecodeGraphs:
    """`forward(batch) -> logits` is the part of a decode step that gets captured: everything after the
    upload and the attention plan, up to the logits of every row. `sample(batch, logits, mode) -> ids`, when
    given, is captured after it for each mode: the sampling of every row, none of the optional passes.

    `hidden(batch) -> hidden states` is the forward of the token-row and extend graphs, which then gather
    each request's last row into `last_rows`; `sample_last(rows, mode) -> ids`, when given, is captured for
    each decode batch size and mode: the LM head and the sampling of the first `rows` of `last_rows`."""

    def __init__(
        self,
        forward: Callable[[ForwardBatch], torch.Tensor],
        attn: AttentionBackend,
        uploader: BatchUploader,
        sizes: list[int],
        scratch_page: int,
        scratch_slot: int,
        page_size: int,
        max_kv_indices: int,
        sample: Callable[[ForwardBatch, torch.Tensor, SampleMode], torch.Tensor] | None = None,
        hidden: Callable[[ForwardBatch], torch.Tensor] | None = None,
        last_rows: LastRows | None = None,
        sample_last: Callable[[int, SampleMode], torch.Tensor] | None = None,
        token_sizes: list[int] = (),
        extend_sizes: list[int] = (),
        extend_reqs: int = 0,
        launch_early: bool = False,
        prefetch_weights: bool = False,
        short_context: int = 0,
    ) -> None:
        self._forward = forward
        self._launch_early = launch_early
        self._prefetch_weights = prefetch_weights
        self._sample = sample
        self._hidden = hidden
        self.last_rows = last_rows
        self._sample_last = sample_last if last_rows is not None else None
        self._last_graphs: dict[tuple[int, SampleMode], torch.cuda.CUDAGraph] = {}
        self._last_sampled: dict[tuple[int, SampleMode], torch.Tensor] = {}
        # A padded row lists one page at least: a size past the index buffer could not even be captured.
        gathers = hidden is not None and last_rows is not None
        self.token_sizes = sorted(s for s in token_sizes if s <= max_kv_indices) if gathers else []
        self._hidden_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden_out: dict[int, torch.Tensor] = {}
        self.extend_sizes = sorted(extend_sizes) if gathers and extend_reqs > 0 else []
        self._extend_reqs = extend_reqs
        self._extend_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._extend_out: dict[int, torch.Tensor] = {}
        self._attn = attn
        self._uploader = uploader
        self.sizes = sorted(sizes)
        # Twins of the small decode graphs, planned for contexts of at most `short_context` tokens and
        # replayed for the steps whose longest context is that short.
        self.short_context = short_context if attn is not None and attn.short_graphs else 0
        self.short_sizes = [s for s in self.sizes if s <= SHORT_MAX_ROWS] if self.short_context else []
        self._scratch = (scratch_page, scratch_slot, page_size)
        self.max_kv_indices = max_kv_indices
        # Decode graphs and their outputs by (rows, short twin or not); the sampling's by (rows, short, mode).
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._sample_graphs: dict[tuple[int, bool, SampleMode], torch.cuda.CUDAGraph] = {}
        self._sampled: dict[tuple[int, bool, SampleMode], torch.Tensor] = {}
        self._replayed_short: dict[int, bool] = {}  # which graph of each size `replay` ran last

    def padding_for(self, step) -> DecodePadding | None:
        """How to pad this step for a graph, or None when it must run eagerly (not a decode step, larger
        than every captured size, or with more page indices than the fixed index buffer holds)."""
        return self._padding(step, self.sizes)

    def padding_for_tokens(self, step) -> DecodePadding | None:
        """`padding_for` a step of one row per new token (`token_rows`), for the hidden-state graphs."""
        return self._padding(step, self.token_sizes)

    def padding_for_extend(self, step) -> ExtendPadding | None:
        """How to pad an extend step for the extend graphs, or None when none holds it (more tokens than the
        largest, more page indices than the fixed index buffer)."""
        tokens = bucket_for(len(step.input_ids), self.extend_sizes)
        if tokens is None or len(step.req_slot) > self._extend_reqs:
            return None
        if len(step.kv_indices) + 1 > self.max_kv_indices:  # the padding adds the scratch page
            return None
        return ExtendPadding(tokens, self._extend_reqs, *self._scratch)

    def _padding(self, step, sizes: list[int]) -> DecodePadding | None:
        n = len(step.req_slot)
        if n != len(step.input_ids):
            return None
        rows = bucket_for(n, sizes)
        if rows is None or len(step.kv_indices) + rows - n > self.max_kv_indices:
            return None
        return DecodePadding(rows, *self._scratch)

    def padding_of(self, kind: str, rows: int) -> Padding:
        """The padding of the graphs of `kind` at `rows` rows (tokens, for EXTEND); "sampling" graphs are
        padded as the decode graphs they follow."""
        if kind == EXTEND:
            return ExtendPadding(rows, self._extend_reqs, *self._scratch)
        return DecodePadding(rows, *self._scratch)

    def capture(self, show_progress: bool = True) -> float:
        """Captures every size, largest first so that smaller graphs reuse its memory; returns seconds."""
        start = time.perf_counter()
        self._attn.prepare_graphs(self.sizes, self.max_kv_indices, self.token_sizes, self.short_sizes)
        pool = torch.cuda.graph_pool_handle()
        empty = _empty_decode_step()
        largest_first = sorted(
            [(rows, DECODE) for rows in self.sizes]
            + [(rows, SHORT) for rows in self.short_sizes]
            + [(rows, TOKEN_ROWS) for rows in self.token_sizes]
            + [(tokens, EXTEND) for tokens in self.extend_sizes]
            + [(rows, LAST_ROWS) for rows in self.last_row_sizes],
            reverse=True,
        )
        for rows, kind in tqdm(largest_first, desc="Capturing CUDA graphs", disable=not show_progress):
            if kind == LAST_ROWS:  # reads last_rows only: nothing to upload or plan
                with self._launch_options(rows):
                    for mode in SampleMode:
                        run = partial(self._sample_last, rows, mode)
                        self._last_graphs[rows, mode], self._last_sampled[rows, mode] = _capture(run, pool)
                continue
            batch = self._uploader.upload(empty, self.padding_of(kind, rows))
            if not batch.in_static_buffer:
                raise RuntimeError(f"the uploader's device buffer cannot hold a {kind} step of {rows} rows")
            if kind == EXTEND:
                self._attn.plan_extend_graph(batch)
            else:
                self._attn.plan_graph(batch, rows, token_rows=kind == TOKEN_ROWS, short=kind == SHORT)
            self._uploader.finish()
            with self._launch_options(rows):
                self._capture_size(batch, rows, kind, pool)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        log.info(
            "captured %d CUDA graphs in %.1f s: decode at batch %s (twins for contexts of up to %d tokens "
            "at %s; %d graphs sampling), small extend steps at %s tokens, extend steps at %s tokens, %d "
            "sampling their last rows",
            len(self.captured()),
            seconds,
            self.sizes,
            self.short_context,
            self.short_sizes,
            len(self._sample_graphs),
            self.token_sizes,
            self.extend_sizes,
            len(self._last_graphs),
        )
        return seconds

    @contextlib.contextmanager
    def _launch_options(self, rows: int) -> Iterator[None]:
        """How the kernels of a graph of `rows` rows launch: early (PDL) up to `pdl.MAX_ROWS`, and with
        small_m's weight prefetch (`prefetch_weights`) where small_m runs."""
        with (
            pdl.launched_early(self._launch_early and rows <= pdl.MAX_ROWS),
            small_m.prefetched(self._prefetch_weights and rows <= small_m.MAX_ROWS),
        ):
            yield

    @property
    def last_row_sizes(self) -> list[int]:
        """The batch sizes of the last-row sampling graphs: none without token-row or extend graphs."""
        gathered = self.token_sizes or self.extend_sizes
        return self.sizes if gathered and self._sample_last is not None else []

    def run_hidden(self, batch: ForwardBatch, kind: str) -> torch.Tensor:
        """What a token-row or extend graph captures: the hidden states of every row, and each request's last
        one gathered into `last_rows`."""
        hidden = self._hidden(batch)
        if kind == TOKEN_ROWS:
            self.last_rows.gather_token_rows(hidden, batch.req_slot, batch.seq_len)
        else:
            self.last_rows.gather_requests(hidden, batch.qo_indptr, batch.req_slot, batch.seq_len)
        return hidden

    def _capture_size(self, batch: ForwardBatch, rows: int, kind: str, pool) -> None:
        if kind == TOKEN_ROWS:
            run = partial(self.run_hidden, batch, kind)
            self._hidden_graphs[rows], self._hidden_out[rows] = _capture(run, pool)
            return
        if kind == EXTEND:
            run = partial(self.run_hidden, batch, kind)
            self._extend_graphs[rows], self._extend_out[rows] = _capture(run, pool)
            return
        short = kind == SHORT
        self._graphs[rows, short], logits = _capture(partial(self._forward, batch), pool)
        self._logits[rows, short] = logits
        for mode in SampleMode if self._sample is not None else ():
            key = (rows, short, mode)
            run = partial(self._sample, batch, logits, mode)
            self._sample_graphs[key], self._sampled[key] = _capture(run, pool)

    def captured(self) -> dict[tuple[str, int, SampleMode | None], torch.cuda.CUDAGraph]:
        """Every captured graph by (kind, rows or tokens, sampling mode or None); "sampling" is the kind of
        the sampling graphs."""
        return (
            {(SHORT if short else DECODE, rows, None): g for (rows, short), g in self._graphs.items()}
            | {
                ("short-sampling" if short else "sampling", rows, mode): g
                for (rows, short, mode), g in self._sample_graphs.items()
            }
            | {(TOKEN_ROWS, rows, None): g for rows, g in self._hidden_graphs.items()}
            | {(EXTEND, tokens, None): g for tokens, g in self._extend_graphs.items()}
            | {(LAST_ROWS, rows, mode): g for (rows, mode), g in self._last_graphs.items()}
        )

    @property
    def samples(self) -> bool:
        """Whether the sampling is captured too (`replay_sampled`)."""
        return self._sample is not None

    @property
    def samples_last_rows(self) -> bool:
        """Whether the last rows' LM head and sampling are captured (`replay_last_sampling`)."""
        return bool(self.last_row_sizes)

    def replay(self, batch: ForwardBatch, rows: int) -> torch.Tensor:
        """Runs a batch uploaded with `padding_for`'s padding; returns the logits of all `rows` rows. A size
        with a short-context twin replays the twin when no row's context is longer than it was planned for."""
        short = rows <= SHORT_MAX_ROWS and self.short_context > 0 and batch.max_seq_len <= self.short_context
        self._attn.plan_graph(batch, rows, short=short)
        self._graphs[rows, short].replay()
        self._replayed_short[rows] = short
        return self._logits[rows, short]

    def replay_sampling(self, rows: int, mode: SampleMode) -> torch.Tensor:
        """The sampling graph of `mode` over the logits of the last `replay` of this size: the sampled ids of
        all `rows` rows, int32 (valid until the next replay of this size and mode)."""
        key = (rows, self._replayed_short.get(rows, False), mode)
        self._sample_graphs[key].replay()
        return self._sampled[key]

    def replay_sampled(self, batch: ForwardBatch, rows: int, mode: SampleMode) -> torch.Tensor:
        """`replay`, then `replay_sampling`."""
        self.replay(batch, rows)
        return self.replay_sampling(rows, mode)

    def replay_last_sampling(self, num_reqs: int, mode: SampleMode) -> torch.Tensor:
        """After `replay_hidden` or `replay_extend`: the LM head and the sampling in `mode` of the first
        `num_reqs` last rows, which also sets their slots' last tokens. Returns the sampled ids of as many
        rows as the graph has (the first `num_reqs` are the requests'), valid until its next replay."""
        rows = bucket_for(num_reqs, self.sizes)
        self._last_graphs[rows, mode].replay()
        return self._last_sampled[rows, mode]

    def replay_extend(self, batch: ForwardBatch, tokens: int) -> torch.Tensor:
        """Runs an extend step uploaded with `padding_for_extend`'s padding; returns the last hidden state of
        all `tokens` tokens, padding included (valid until the next replay of this size), and leaves each
        request's last row in `last_rows`."""
        self._attn.plan_extend_graph(batch)
        self._extend_graphs[tokens].replay()
        return self._extend_out[tokens]

    def replay_hidden(self, batch: ForwardBatch, rows: int) -> torch.Tensor:
        """Runs a step of one row per token (`token_rows`) uploaded with `padding_for_tokens`'s padding;
        returns the last hidden state of all `rows` rows (valid until the next replay of this size), and
        leaves each request's last row in `last_rows`."""
        self._attn.plan_graph(batch, rows, token_rows=True)
        self._hidden_graphs[rows].replay()
        return self._hidden_out[rows]


def _capture(run: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`run` captured into a graph in `pool`, and the output tensor the graph writes."""
    # One eager run first: kernels compile and libraries set up their handles outside the capture.
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out
