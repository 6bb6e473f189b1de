"""Paged attention through FlashInfer (0.5.x): the prefill wrapper for extend steps, the tensor-core decode
wrapper for decode steps (the CUDA-core decode kernel rejects Qwen2.5's group size of 7), and one decode
wrapper per captured CUDA-graph batch size, whose index buffers stay at fixed addresses.

Two speed-ups reach into FlashInfer's private attributes: the pinned plan buffers below, and the decode
re-plan (`_replan_decode`). Both were written against 0.5.x (`PRIVATE_API_VERSIONS`); with any other version
the backend warns and uses only the public plan(), waiting for the previous step's copies before each one.

`plan()` is host work plus asynchronous copies out of a pinned buffer that FlashInfer fills with the kernels'
schedule. With two steps in flight, planning step N+1 would overwrite that buffer while the copy for step N
may still be queued behind step N-1 (mini-sglang's PR 103 was this race). So the backend owns several pinned
buffers, hands one to the wrapper before each plan, and reuses a buffer only after an event recorded behind
its copies has completed.
"""

from __future__ import annotations

import logging

import torch

from minisgl.attention.base import AttentionBackend, AttentionConfig
from minisgl.worker.batch import ForwardBatch
from minisgl.worker.kv_cache import KVCache

log = logging.getLogger("minisgl.worker")

PRIVATE_API_VERSIONS = (
    "0.5.",
)  # FlashInfer versions whose private attributes the fast paths were written for
WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partial results)
PLAN_BUFFER_BYTES = 8 << 20  # the size of FlashInfer's own pinned int workspace
PLAN_DEPTH = 2  # steps in flight at once


def import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise RuntimeError(
            "the flashinfer attention backend needs the flashinfer package (0.5.x) on a CUDA machine; "
            "use --attention torch (or auto) without it"
        ) from e
    return flashinfer


def private_api_checked(fi) -> bool:
    version = getattr(fi, "__version__", "unknown")
    if version.startswith(PRIVATE_API_VERSIONS):
        return True
    log.warning(
        "FlashInfer %s is not a version the fast plan paths were checked against (%s): using its public "
        "plan() with a wait before each",
        version,
        ", ".join(v + "x" for v in PRIVATE_API_VERSIONS),
    )
    return False


class _PlanBuffers:
    """Pinned host buffers handed out round-robin; each is reused only once the copies queued from it ran."""

    def __init__(self, depth: int, nbytes: int, private_api: bool) -> None:
        self._private = private_api
        self._buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        self._done = [torch.cuda.Event() for _ in range(depth)]
        self._turn = 0

    def plan(self, wrapper, plan, *args, **kwargs) -> None:
        """Runs `plan(*args, **kwargs)` with `wrapper` holding a free pinned buffer."""
        if not self._private:
            # The wrapper's one buffer may still be read by a queued copy of the step before.
            torch.cuda.current_stream().synchronize()
            plan(*args, **kwargs)
            return
        turn = self._turn
        self._turn = (turn + 1) % len(self._buffers)
        self._done[turn].synchronize()
        # FlashInfer 0.5.x keeps this buffer in a private attribute and reads it on every plan().
        wrapper._pin_memory_int_workspace_buffer = self._buffers[turn]
        plan(*args, **kwargs)
        self._done[turn].record()


class FlashInferBackend(AttentionBackend):
    graphs = True
    devices = ("cuda",)

    def __init__(self, config: AttentionConfig, kv_cache: KVCache) -> None:
        fi = import_flashinfer()
        super().__init__(config, kv_cache)
        self._fi = fi
        self._private = private_api_checked(fi)
        k0 = kv_cache.k(0)
        self.device = k0.device
        self.dtype = k0.dtype
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # fa2 for prefill too: the tensor-core decode path uses the same fa2 module, so one JIT compilation
        # serves both (fa3 would be a second one of about a minute on a fresh machine).
        self._prefill = fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        self._decode = None
        self._graph_decode: dict[int, object] = {}
        self._plans = _PlanBuffers(PLAN_DEPTH, PLAN_BUFFER_BYTES, self._private)
        self._kv = [(kv_cache.k(i), kv_cache.v(i)) for i in range(kv_cache.shape.num_layers)]
        self._wrapper = None
        # qo_indptr of a decode batch is 0..n; kept once on both sides instead of copied every step.
        self._arange_host = torch.arange(65537, dtype=torch.int32).pin_memory()
        self._arange_dev = self._arange_host.to(self.device)
        self._planned_wrappers: set[int] = set()

    def prepare_graphs(
        self, sizes: list[int], max_kv_indices: int, token_sizes: list[int] = (), short_sizes: list[int] = ()
    ) -> None:
        """Per graph batch size (decode and token-row graphs of one size share it): a FlashInfer decode
        wrapper over index buffers that never move."""
        indices = torch.zeros(max_kv_indices, dtype=torch.int32, device=self.device)
        for b in sorted({*sizes, *token_sizes}):
            self._graph_decode[b] = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=self.device),
            )

    def plan(self, batch: ForwardBatch) -> None:
        self._plan(batch, self._decode_wrapper() if batch.is_decode else self._prefill)

    def plan_graph(
        self, batch: ForwardBatch, rows: int, token_rows: bool = False, short: bool = False
    ) -> None:
        self._plan(batch, self._graph_decode[rows])

    def _decode_wrapper(self):
        # Made on first use: paired with another decode backend, this one never plans a decode step.
        if self._decode is None:
            self._decode = self._fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_tensor_cores=True
            )
        return self._decode

    def _plan(self, batch: ForwardBatch, wrapper) -> None:
        c = self.config
        common = {"q_data_type": self.dtype, "kv_data_type": self.dtype, "non_blocking": True}
        fast = self._private and batch.num_reqs < 65536
        if wrapper is not self._prefill and id(wrapper) in self._planned_wrappers and fast:
            self._plans.plan(wrapper, self._replan_decode, wrapper, batch)
        elif wrapper is not self._prefill:
            self._planned_wrappers.add(id(wrapper))
            self._plans.plan(
                wrapper,
                wrapper.plan,
                batch.host_kv_indptr,
                batch.kv_indices,
                batch.host_kv_last_page_len,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.page_size,
                **common,
            )
        else:
            self._plans.plan(
                wrapper,
                wrapper.plan,
                batch.host_qo_indptr,
                batch.host_kv_indptr,
                batch.kv_indices,
                batch.host_kv_last_page_len,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                c.page_size,
                causal=True,
                **common,
            )
        self._wrapper = wrapper
        self._planned_batch = batch

    def _replan_decode(self, wrapper, batch: ForwardBatch) -> None:
        """What the tensor-core decode wrapper's plan() does, for every decode batch after its first, without
        its per-request host work: plan() takes the longest sequence with Python's max() over a tensor (one
        torch call per request) and recomputes lengths the step already carries. Only the page tables, the
        lengths, the batch size and the kernels' schedule change here; every other attribute that run()
        reads was set by the full plan() this wrapper had first."""
        c, n = self.config, batch.num_reqs
        if wrapper.is_cuda_graph_enabled:
            wrapper._paged_kv_indptr_buf.copy_(batch.host_kv_indptr, non_blocking=True)
            wrapper._paged_kv_last_page_len_buf.copy_(batch.host_kv_last_page_len, non_blocking=True)
            wrapper._paged_kv_indices_buf[: batch.kv_indices.shape[0]].copy_(
                batch.kv_indices, non_blocking=True
            )
        else:
            wrapper._paged_kv_indptr_buf = batch.host_kv_indptr.to(self.device, non_blocking=True)
            wrapper._paged_kv_indices_buf = batch.kv_indices
            wrapper._paged_kv_last_page_len_buf = batch.host_kv_last_page_len.to(
                self.device, non_blocking=True
            )
            wrapper._qo_indptr_buf = self._arange_dev[: n + 1]
        wrapper._batch_size = n
        wrapper._max_kv_len = batch.max_seq_len
        wrapper._plan_info = wrapper._cached_module.plan(
            wrapper._float_workspace_buffer,
            wrapper._int_workspace_buffer,
            wrapper._pin_memory_int_workspace_buffer,
            self._arange_host[: n + 1],
            batch.host_kv_indptr,
            batch.host_seq_len,
            n,  # rows of q: one per request
            n,
            c.num_heads,
            c.num_kv_heads,
            c.page_size,
            wrapper.is_cuda_graph_enabled,
            c.head_dim,
            c.head_dim,
            False,  # causal: a single query row sees its whole sequence
            -1,  # no sliding window
            -1,  # no fixed split size
            False,  # split-KV allowed
            0,  # no co-located CTAs
        )

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self._wrapper.run(q, self._kv[layer])
