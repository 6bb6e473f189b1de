"""The step runner: one scheduler step in, one sampled token per request out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from minisgl import tp
from minisgl.attention import BACKENDS, create_backend
from minisgl.attention.base import AttentionConfig
from minisgl.kernels import small_m
from minisgl.kernels.rounding import available as kernels_available
from minisgl.layers import LayerOptions, StepTokens
from minisgl.models import ModelConfig, load_model
from minisgl.proto.step import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, Logprobs, PromptLogprobs
from minisgl.sampling import Joins, Sampler, masks
from minisgl.sampling.params import SampleMode
from minisgl.worker import distributed
from minisgl.worker.batch import BatchUploader, ForwardBatch
from minisgl.worker.config import WorkerConfig, dtype_name, parse_dtype
from minisgl.worker.cuda_graph import DecodeGraphs
from minisgl.worker.kv_cache import KVCache, KVCacheShape
from minisgl.worker.last_rows import LastRows
from minisgl.worker.padding import (
    DecodePadding,
    ExtendPadding,
    Padding,
    extend_graph_sizes,
    graph_batch_sizes,
    token_graph_sizes,
)
from minisgl.worker.token_rows import TokenRows, token_rows, worth_rows

log = logging.getLogger("minisgl.worker")

IN_FLIGHT = 2  # steps launched and not yet collected, at most: the loop overlaps step N+1 with step N
# Prompt positions whose logprobs one LM-head pass computes: the logits of a chunk are [rows, vocab] float32
# (151,936 columns for Qwen: about 150 MB at 256 rows), however long the prompt.
PROMPT_LOGPROB_ROWS = 256
INT32_LOCATIONS = 2**31  # out_loc is int32: page * page_size + offset must stay below this


@dataclass
class StepHandle:
    """A launched step. `tokens` (host memory) holds its sampled ids once `ready` has completed, and
    `logprobs` (host memory too: the sampled token's [n], the top ids and logprobs [n, m]) theirs, when some
    request of the step asked."""

    step_id: int
    tokens: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # The prompt logprobs the step asked for, in host memory: the targets' [p], top ids and logprobs [p, q].
    prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    collected: bool = field(default=False)

    def done(self) -> bool:
        """Whether the step's device work has completed (`collect` would not wait)."""
        return self.ready is None or self.ready.query()

    def result_logprobs(self) -> Logprobs | None:
        """The logprobs as the result slot takes them (numpy views, valid until IN_FLIGHT more launches)."""
        if self.logprobs is None:
            return None
        return Logprobs(*(t.numpy() for t in self.logprobs))

    def result_prompt_logprobs(self) -> PromptLogprobs | None:
        """The prompt logprobs as the result slot takes them (numpy views, valid until IN_FLIGHT more
        launches)."""
        if self.prompt is None:
            return None
        return PromptLogprobs(*(t.numpy() for t in self.prompt))


class _HostLogprobs:
    """Pinned buffers a step's logprobs are copied into, one set per step in flight."""

    def __init__(self, max_batch: int, pinned: bool) -> None:
        self.logprob = torch.zeros(max_batch, dtype=torch.float32, pin_memory=pinned)
        self.top_ids = torch.zeros(max_batch * MAX_TOP_LOGPROBS, dtype=torch.int32, pin_memory=pinned)
        self.top_logprobs = torch.zeros(max_batch * MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=pinned)

    def copy(self, chosen: torch.Tensor, ids: torch.Tensor, values: torch.Tensor):
        n, m = ids.shape
        out = (self.logprob[:n], self.top_ids[: n * m].view(n, m), self.top_logprobs[: n * m].view(n, m))
        for dst, src in zip(out, (chosen, ids, values), strict=True):
            dst.copy_(src, non_blocking=True)
        return out


class ModelRunner:
    """Owns the weights, the KV cache, the attention backend, the sampler and each slot's last token.

    Per step the host work is a fixed number of numpy/torch calls whatever the batch size: one upload of the
    packed step arrays, one attention plan, one forward (a graph replay for decode steps when graphs are on),
    one sampling pass, one copy of the sampled ids to pinned host memory. `launch` queues all of it and
    returns; `collect` waits for the ids. On the CPU `launch` computes everything before it returns. A step
    with a request that asked for penalties also counts its tokens, and one that asked for logprobs computes
    and copies them; the others skip both (decided from host copies of each slot's options).
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        show_progress: bool = True,
        on_phase: Callable[[str], None] = lambda phase: None,
        tp_rank: int = 0,
    ) -> None:
        """`config` is resolved here (`WorkerConfig.resolved`); `on_phase` hears each slow part of the start
        as it begins (the worker tells the scheduler). With `config.tp` above 1 this is rank `tp_rank`, and
        torch.distributed must already join the ranks (`minisgl.worker.distributed.init`)."""
        cfg = self.config = config.resolved()
        self.tp_rank, self.tp_size = tp_rank, cfg.tp
        self.device = torch.device(distributed.rank_device(cfg.device, tp_rank, cfg.tp))
        self.dtype = parse_dtype(cfg.dtype)
        on_cuda = self.device.type == "cuda"
        self.model_config = mc = ModelConfig.from_dir(cfg.model)
        decode_backend = BACKENDS[cfg.decode_attention].load()
        self.fused_kernels = cfg.fused_kernels and kernels_available(self.device)
        # small_m's tl.dot would run float32 through TF32: it is for the half-precision dtypes only.
        self.small_m_kernels = self.fused_kernels and self.dtype in (torch.bfloat16, torch.float16)
        fused, small = self.fused_kernels, self.small_m_kernels
        options = LayerOptions(self.dtype, fused=fused, small_m=small, tp_rank=tp_rank, tp_size=cfg.tp)
        on_phase("loading weights")
        self.model = load_model(cfg.model, options, self.device, show_progress=show_progress)
        # Graphs pad decode batches with rows that write their K/V into a page of their own, past the pages
        # the scheduler is told about, and sample into a slot past the last real one.
        use_graphs = cfg.cuda_graphs and on_cuda and decode_backend.graphs and self.model.capturable
        # Before the KV budget is measured: the penalties' per-slot token counts are [slots, vocab] int32.
        self.sampler = Sampler(cfg.max_batch + 1, self.device, vocab_size=mc.vocab_size)
        # W: the words of a token mask over the logits (the scheduler's ring has the same, from our hello).
        self.mask_words = -(-mc.vocab_size // 32)
        on_phase("allocating the KV cache")
        # Each rank holds its heads' slice of every page: the scheduler's page numbers mean the same on all.
        kv_heads = tp.local_kv_heads(mc.num_kv_heads, cfg.tp)
        kv_shape = KVCacheShape(mc.num_layers, cfg.page_size, kv_heads, mc.head_dim, self.dtype)
        self._usable_pages = self._num_pages(kv_shape, graphs=use_graphs)
        if cfg.tp > 1:
            # Free memory differs a little between GPUs; every rank must offer the scheduler the same pages.
            self._usable_pages = distributed.agree_min(self._usable_pages, self.device)
        self.kv_cache = KVCache(kv_shape, self._usable_pages + int(use_graphs), self.device)
        self.attn = create_backend(
            cfg.attention,
            cfg.decode_attention,
            AttentionConfig(
                mc.num_heads // cfg.tp,
                kv_heads,
                mc.head_dim,
                cfg.page_size,
                cfg.decode_graph_context,
                cfg.short_graph_context,
            ),
            self.kv_cache,
        )
        scratch_slot = cfg.max_batch
        # The token each slot sampled last: decode inputs name it as -(slot + 1), so the host never needs it.
        self.last_token = torch.zeros(cfg.max_batch + 1, dtype=torch.int32, device=self.device)
        max_kv_indices = self._usable_pages + cfg.max_batch
        self.uploader = BatchUploader(self._staging_capacity(max_kv_indices), self.device, depth=IN_FLIGHT)
        self._host_tokens = [
            torch.zeros(cfg.max_batch, dtype=torch.int32, pin_memory=on_cuda) for _ in range(IN_FLIGHT)
        ]
        self._host_logprobs = [_HostLogprobs(cfg.max_batch, on_cuda) for _ in range(IN_FLIGHT)]
        # Made on the first step that asks for prompt logprobs: the others never need them.
        self._host_prompt: list[_HostLogprobs | None] = [None] * IN_FLIGHT
        self._handles: list[StepHandle | None] = [None] * IN_FLIGHT
        self._turn = 0
        self.graphs: DecodeGraphs | None = None
        self.last_rows: LastRows | None = None
        if use_graphs:
            self.last_rows = LastRows(cfg.max_batch, mc.hidden_size, self.dtype, self.device, scratch_slot)
            self.graphs = DecodeGraphs(
                self._forward_logits,
                self.attn,
                self.uploader,
                graph_batch_sizes(cfg.max_batch),
                scratch_page=self._usable_pages,
                scratch_slot=scratch_slot,
                page_size=cfg.page_size,
                max_kv_indices=max_kv_indices,
                sample=self._sample_rows if cfg.graph_sampling else None,
                hidden=self._forward_hidden if cfg.extend_graphs else None,
                last_rows=self.last_rows,
                sample_last=self._sample_last_rows if cfg.graph_sampling else None,
                token_sizes=token_graph_sizes(cfg.token_graph_tokens, cfg.max_step_tokens),
                extend_sizes=self._extend_graph_sizes(),
                extend_reqs=cfg.max_batch,
                launch_early=cfg.pdl,
                prefetch_weights=cfg.prefetch_weights,
                short_context=cfg.short_graph_context,
            )
            on_phase("capturing CUDA graphs")
            with torch.inference_mode():
                self.graphs.capture(show_progress)
                self._compile_eager_lm_head()

    def _compile_eager_lm_head(self) -> None:
        """Every small prefill runs the LM head eagerly on its requests' last rows, outside the graphs, whose
        kernels were compiled launched early (PDL): compile those variants now (Triton's one for a single
        row, for 16, and for any other count), not inside the first requests."""
        hidden = torch.zeros(
            small_m.MAX_ROWS, self.model_config.hidden_size, dtype=self.dtype, device=self.device
        )
        for rows in (1, 2, small_m.MAX_ROWS):
            self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)

    def _extend_graph_sizes(self) -> list[int]:
        """The token counts of the extend graphs: none unless asked for, and the decode backend (which runs
        the graphs' attention) can plan them."""
        cfg = self.config
        if not (cfg.extend_graphs and self.attn.extend_graphs):
            return []
        return extend_graph_sizes(cfg.extend_graph_tokens, cfg.max_step_tokens)

    @property
    def num_pages(self) -> int:
        """KV pages the scheduler may hand out (a scratch page for graph padding is not among them)."""
        return self._usable_pages

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    @property
    def max_step_tokens(self) -> int:
        return self.config.max_step_tokens

    def model_facts(self) -> dict[str, Any]:
        mc = self.model_config
        return {
            "architecture": mc.architecture,
            "vocab_size": mc.vocab_size,
            "num_layers": mc.num_layers,
            "hidden_size": mc.hidden_size,
            "num_heads": mc.num_heads,
            "num_kv_heads": mc.num_kv_heads,
            "head_dim": mc.head_dim,
            "max_position_embeddings": mc.max_position_embeddings,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
        }

    def run_step(self, step) -> torch.Tensor:
        """Runs one extend or decode step; returns the sampled ids, int32 [n] on the CPU, in request order."""
        return torch.from_numpy(self.collect(self.launch(step)).copy())

    @torch.inference_mode()
    def launch(self, step) -> StepHandle:
        """Queues the whole step on the device and returns at once. The step's arrays are copied before this
        returns, so its ring slot may be released. At most IN_FLIGHT steps may be launched and not collected.
        """
        n = len(step.req_slot)
        turn = self._turn
        previous = self._handles[turn]
        if previous is not None and not previous.collected:
            raise RuntimeError(f"more than {IN_FLIGHT} steps launched without collecting their results")
        self._turn = (turn + 1) % IN_FLIGHT
        self._check_limits(step)
        asked = _prompt_targets(step, self.device)
        mask_parts = masks.host_parts(step)
        # A step that asks for prompt logprobs runs eagerly (the scheduler asks only in extend steps anyway).
        rows, padding = self._graph_for(step, eager=asked is not None, masked=mask_parts is not None)
        batch = self.uploader.upload(step if rows is None else rows.step, padding)
        if padding is not None and not batch.in_static_buffer:
            # Rare (many prefix pages): too large for the addresses the graphs read; run it eagerly.
            self.uploader.finish()
            rows, padding = None, None
            batch = self.uploader.upload(step)
        tokens = self._host_tokens[turn][:n]
        if n == 0:
            self._apply_joins(step, self._upload_joins(step, batch, rows, mask_parts))
            handle = StepHandle(step.step_id, tokens, None)
        else:
            # The forward is queued first: the joins' parameters, the sampling's arrays and its plan are
            # read only by the sampling, and every microsecond before the forward starts delays the step
            # (issue 12).
            logits, prompt = self._queue_forward(step, batch, rows, padding, asked, turn)
            batch = self._upload_joins(step, batch, rows, mask_parts)
            self._apply_joins(step, batch)
            plan = self.sampler.plan_for(np.asarray(step.req_slot))
            graph_samples = plan.graphable and mask_parts is None and self.graphs is not None
            logprobs = None
            if logits is not None and padding is not None and graph_samples and self.graphs.samples:
                # A decode graph: its sampling replayed too, the slots' last tokens set in the graph.
                sampled = self.graphs.replay_sampling(padding.rows, plan.mode)[:n]
            elif logits is None and graph_samples and self.graphs.samples_last_rows:
                # The LM head and the sampling of the requests' last rows, which the replay gathered.
                sampled = self.graphs.replay_last_sampling(n, plan.mode)[:n]
            else:
                if logits is None:  # a token-row or extend graph gathered each request's last row
                    last = self.last_rows
                    req_slot, seq_len = last.slot[:n], last.seq_len[:n]
                    logits = self.model.compute_logits(last.hidden[:n])
                else:
                    req_slot, seq_len = batch.req_slot[:n], batch.seq_len[:n]
                logits = logits[:n]  # a padded step's logits have a row per padding row too
                if plan.penalties:
                    self._count_tokens(batch, n, np.asarray(step.input_ids))
                step_masks = None
                if mask_parts is not None:
                    step_masks = masks.from_uploaded(batch.extra, self.mask_words)
                sampled = self.sampler.sample(logits, req_slot, seq_len, plan, step_masks)
                if plan.logprobs:
                    found = self.sampler.logprobs(logits, sampled, plan.top_logprobs)
                    logprobs = self._host_logprobs[turn].copy(*found)
                self.last_token[req_slot] = sampled
            tokens.copy_(sampled, non_blocking=True)
            ready = None
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            handle = StepHandle(step.step_id, tokens, ready, logprobs, prompt)
        self.uploader.finish()
        self._handles[turn] = handle
        return handle

    def _graph_for(self, step, eager: bool, masked: bool) -> tuple[TokenRows | None, Padding | None]:
        """Which captured graph runs the step: a decode graph (its padding), the token-row graphs (the rows
        and their padding), an extend graph (its padding); (None, None) when it runs `eager`ly or has none.
        A `masked` step takes a decode graph only (and samples eagerly after it)."""
        if self.graphs is None or eager:
            return None, None
        padding = self.graphs.padding_for(step)
        if padding is not None or masked:
            return None, padding
        rows, padding = self._as_token_rows(step)
        if rows is None:
            padding = self.graphs.padding_for_extend(step)
        return rows, padding

    def _queue_forward(
        self,
        step,
        batch: ForwardBatch,
        rows: TokenRows | None,
        padding: Padding | None,
        asked: tuple[torch.Tensor, torch.Tensor] | None,
        turn: int,
    ) -> tuple[torch.Tensor | None, tuple | None]:
        """Queues the step's forward on the graph `_graph_for` chose (or eagerly) up to the logits of each
        request's last new token (a padded decode step's padding rows too). Returns (logits, the prompt
        logprobs' host buffers or None). A token-row or extend graph stops short of the logits (None): it
        leaves each request's last row, slot and length in `last_rows`, whose LM head runs with the
        sampling."""
        prompt = None
        if rows is not None or isinstance(padding, ExtendPadding):
            if rows is not None:
                self.graphs.replay_hidden(batch, padding.rows)
            else:
                self.graphs.replay_extend(batch, padding.tokens)
            return None, None
        if padding is not None:
            logits = self.graphs.replay(batch, padding.rows)
        elif asked is not None:
            self.attn.plan(batch)
            hidden = self._forward_hidden(batch)
            logits = self.model.compute_logits(hidden[batch.qo_indptr[1:] - 1])
            prompt = self._prompt_logprobs(hidden, *asked, int(step.prompt_top), turn)
        else:
            self.attn.plan(batch)
            logits = self._forward_logits(batch)
        return logits, prompt

    def collect(self, handle: StepHandle) -> np.ndarray:
        """Waits for a launched step; returns its sampled ids, int32 [n], a view valid until IN_FLIGHT more
        launches."""
        if handle.ready is not None:
            handle.ready.synchronize()
        handle.collected = True
        return handle.tokens.numpy()

    @torch.inference_mode()
    def forward_logits(self, step) -> torch.Tensor:
        """Runs the step's forward eagerly (writing its K/V like run_step) and returns the logits of each
        request's last new token, [n, vocab] on the device; nothing is sampled and no slot's last token
        changes."""
        self._check_limits(step)
        batch = self.uploader.upload(step)
        self._apply_joins(step, self.uploader.upload_joins(batch, step))
        if batch.num_reqs == 0:
            self.uploader.finish()
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        self.attn.plan(batch)
        logits = self._forward_logits(batch)
        self.uploader.finish()
        return logits

    def _forward_logits(self, batch: ForwardBatch) -> torch.Tensor:
        """The device part of a step after the plan: what a decode graph captures."""
        hidden = self._forward_hidden(batch)
        if not batch.is_decode:
            hidden = hidden[batch.qo_indptr[1:] - 1]
        return self.model.compute_logits(hidden)

    def _as_token_rows(self, step) -> tuple[TokenRows | None, DecodePadding | None]:
        """A small extend step as one row per new token and its padding for a captured graph, or (None,
        None) when it has no graph (too many tokens, key positions or page indices)."""
        sizes = self.graphs.token_sizes
        if not sizes or not worth_rows(step, sizes[-1]):
            return None, None
        rows = token_rows(step, self.page_size, self.config.max_batch)
        padding = self.graphs.padding_for_tokens(rows.step)
        return (rows, padding) if padding is not None else (None, None)

    def _sample_rows(self, batch: ForwardBatch, logits: torch.Tensor, mode: SampleMode) -> torch.Tensor:
        """What a decode graph captures after the logits for a step whose plan is `graphable`: every row's
        sample in `mode` and its slot's last token."""
        return self._sample_slots(logits, batch.req_slot, batch.seq_len, mode)

    def _sample_last_rows(self, rows: int, mode: SampleMode) -> torch.Tensor:
        """What a last-row graph captures: the LM head over the first `rows` of `last_rows`, each row's
        sample in `mode` and its slot's last token."""
        last = self.last_rows
        logits = self.model.compute_logits(last.hidden[:rows])
        return self._sample_slots(logits, last.slot[:rows], last.seq_len[:rows], mode)

    def _sample_slots(
        self, logits: torch.Tensor, slots: torch.Tensor, seq_len: torch.Tensor, mode: SampleMode
    ) -> torch.Tensor:
        sampled = self.sampler.sample(logits, slots, seq_len, mode)
        self.last_token[slots] = sampled
        return sampled

    def _forward_hidden(self, batch: ForwardBatch) -> torch.Tensor:
        """The model's last hidden state at every new token of the step, [t, hidden]."""
        step = StepTokens(self.last_token, self.kv_cache.token_ids, batch.out_loc)
        return self.model(batch.input_ids, batch.positions, self.attn, step)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, top: int, turn: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logprob of `targets[i]` at new token `rows[i]` of the step, with the `top` most likely ids and
        their logprobs there, copied to host memory: the LM head runs over PROMPT_LOGPROB_ROWS rows at a time,
        so a long prompt never holds more than that many rows of logits."""
        p = rows.shape[0]
        host = self._host_prompt[turn]
        if host is None:
            host = self._host_prompt[turn] = _HostLogprobs(self.max_step_tokens, self.device.type == "cuda")
        out = (
            host.logprob[:p],
            host.top_ids[: p * top].view(p, top),
            host.top_logprobs[: p * top].view(p, top),
        )
        for start in range(0, p, PROMPT_LOGPROB_ROWS):
            end = min(start + PROMPT_LOGPROB_ROWS, p)
            logits = self.model.compute_logits(hidden[rows[start:end]])
            found = Sampler.logprobs(logits, targets[start:end], top)
            for dst, src in zip(out, found, strict=True):
                dst[start:end].copy_(src, non_blocking=True)
        return out

    def _upload_joins(self, step, batch: ForwardBatch, rows: TokenRows | None, mask_parts) -> ForwardBatch:
        """`batch` with the step's joins and what the sampling reads: the token masks, the cached prefixes of
        joining requests with penalties, each token row's request slot."""
        extra = _cached_prefix_of_penalized_joins(step, self.page_size) or {}
        if mask_parts is not None:
            extra |= mask_parts
        if rows is not None:
            extra["token_slot"] = rows.token_slot
        return self.uploader.upload_joins(batch, step, extra)

    def _apply_joins(self, step, batch: ForwardBatch) -> None:
        if len(step.join_slot):
            self.sampler.join(Joins.of_step(step), on_device=batch.joins)
        prefix = batch.extra.get("prefix_loc")
        if prefix is not None:
            # Penalized requests that start from cached pages: their prefix's ids are where its KV is.
            slots, positions = batch.extra["prefix_slot"], batch.extra["prefix_pos"]
            self.sampler.count(slots, self.kv_cache.token_ids[prefix], positions)

    def _count_tokens(self, batch: ForwardBatch, n: int, input_ids: np.ndarray) -> None:
        """Counts the step's new tokens for their slots' penalties (after the forward, which wrote their ids
        beside their KV: the `-(slot + 1)` inputs resolved to the sampled ids they stand for)."""
        t = len(input_ids)
        slots = batch.req_slot[:n]
        if "token_slot" in batch.extra:  # a step of one row per token: req_slot is per row
            slots = batch.extra["token_slot"]
        elif t != n:
            slots = torch.repeat_interleave(
                slots, batch.qo_indptr[1 : n + 1] - batch.qo_indptr[:n], output_size=t
            )
        ids = self.kv_cache.token_ids[batch.out_loc[:t]]
        # A decode step feeds back only sampled tokens: all generated, decided on the host.
        sampled = True if (input_ids < 0).all() else batch.input_ids[:t] < 0
        self.sampler.count(slots, ids, batch.positions[:t], sampled=sampled)

    def _check_limits(self, step) -> None:
        n, t = len(step.req_slot), len(step.input_ids)
        if n > self.config.max_batch or t > self.config.max_step_tokens:
            raise ValueError(
                f"step of {n} requests / {t} tokens exceeds {self.max_batch} / {self.max_step_tokens}"
            )

    def _num_pages(self, shape: KVCacheShape, graphs: bool) -> int:
        cfg = self.config
        if cfg.num_pages is not None:
            return cfg.num_pages
        if cfg.kv_bytes is not None:
            budget = cfg.kv_bytes
        else:
            free, _total = torch.cuda.mem_get_info(self.device)
            reserve = self._transient_bytes(graphs and cfg.graph_sampling, graphs)
            budget = int(free * cfg.kv_fraction) - reserve
            log.info(
                "KV budget: %.2f GiB = %.2f of %.2f GiB free after the weights, less %.2f GiB for "
                "activations, sampling and graphs",
                max(budget, 0) / 2**30,
                cfg.kv_fraction,
                free / 2**30,
                reserve / 2**30,
            )
        pages = shape.pages_for_budget(budget)
        if pages <= 0:
            raise ValueError(f"a KV budget of {budget} bytes holds no page of {shape.bytes_per_page} bytes")
        most = INT32_LOCATIONS // cfg.page_size - int(graphs)  # the graphs' scratch page
        if pages > most:
            log.info("KV pages capped at %d so that every KV location fits in int32", most)
        return min(pages, most)

    def _transient_bytes(self, graph_sampling: bool, graphs: bool) -> int:
        """A generous bound on what a step allocates beyond the weights and the KV cache: a full-size
        prefill's activations (twice with extend graphs: the largest keeps its own in the graphs' pool), a
        full batch's logits through the filtered sampler (twice with `graph_sampling`, likewise),
        FlashInfer's workspaces."""
        mc, cfg = self.model_config, self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        qkv = (mc.num_heads // cfg.tp + 2 * tp.local_kv_heads(mc.num_kv_heads, cfg.tp)) * mc.head_dim
        per_token = (4 * mc.hidden_size + 2 * qkv + 3 * mc.intermediate_size // cfg.tp) * elem
        # Logits, noise hashes (int64), sort values and indices; bias, penalties and logprobs' float copies.
        sampling = cfg.max_batch * mc.vocab_size * 48 * (2 if graph_sampling else 1)
        extend_graph = max(extend_graph_sizes(cfg.extend_graph_tokens, cfg.max_step_tokens), default=0)
        activations = (cfg.max_step_tokens + (extend_graph if graphs else 0)) * per_token
        return activations + sampling + (1 << 30)

    def _staging_capacity(self, max_kv_indices: int) -> int:
        # Tokens: ids, positions, out_loc. Requests: slot, seq_len, two indptrs, last-page length. KV
        # indices: every page once per request plus a padding page per row. Joins: 12 words per request (the
        # seed takes two), an indptr and 300 bias pairs, and one word of alignment. The uploader grows past
        # this if prefix sharing (or the cached prefixes of penalized requests) needs more.
        cfg = self.config
        joins = (12 + 1 + 2 * MAX_LOGIT_BIAS) * cfg.max_batch + 1 + 1
        # Token masks: a mask per request at most, and each masked row's row and mask numbers.
        token_masks = cfg.max_batch * (self.mask_words + 2)
        return 3 * cfg.max_step_tokens + 5 * cfg.max_batch + 2 + max_kv_indices + joins + token_masks


def _prompt_targets(step, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The new tokens of the step whose logits give a prompt logprob (their rows, int64 [p]) and the tokens
    whose logprob they give (int32 [p]), on the device; None when the step asks for none (nothing is read)."""
    if not step.prompt_logprobs:
        return None
    targets = np.asarray(step.logprob_target)
    rows = np.flatnonzero(targets >= 0)
    if len(rows) == 0:
        return None
    return torch.from_numpy(rows).to(device), torch.from_numpy(targets[rows]).to(device)


def _cached_prefix_of_penalized_joins(step, page_size: int) -> dict[str, np.ndarray] | None:
    """For each request joining at this step with a penalty and a cached prefix: the slot, position and KV
    location of every prefix token (int32 arrays `prefix_slot`, `prefix_pos`, `prefix_loc`); None when there
    is none. Host numpy over those requests only: nothing for steps without such a join."""
    if len(step.join_slot) == 0:
        return None
    penalized = (
        (step.join_presence_penalty != 0)
        | (step.join_frequency_penalty != 0)
        | (step.join_repetition_penalty != 1)
    )
    if not penalized.any():
        return None
    req_slot = np.asarray(step.req_slot)
    rows = np.flatnonzero(np.isin(req_slot, step.join_slot[penalized]))
    qo_indptr, kv_indptr = np.asarray(step.qo_indptr), np.asarray(step.kv_indptr)
    starts = np.asarray(step.positions)[qo_indptr[rows]].astype(np.int64)
    total = int(starts.sum())
    if total == 0:
        return None
    row_of = np.repeat(rows, starts)
    pos = np.arange(total) - np.repeat(np.cumsum(starts) - starts, starts)
    page = np.asarray(step.kv_indices)[kv_indptr[row_of] + pos // page_size].astype(np.int64)
    return {
        "prefix_slot": req_slot[row_of],
        "prefix_pos": pos,
        "prefix_loc": page * page_size + pos % page_size,
    }
