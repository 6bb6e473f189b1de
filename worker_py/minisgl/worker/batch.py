"""One step's arrays on the device, and the host-side sizes that shape the step's kernels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minisgl.worker.padding import DecodePadding, padded_arrays

# The int32 arrays of a step, in the order they are packed into one host buffer for one host-to-device copy.
# The first three are what a captured decode graph reads, so they come first: for a batch padded to B rows
# they sit at offsets 0, B and 2B of the device buffer, where the graph of size B was captured to find them.
_PACKED = (
    "input_ids",
    "positions",
    "out_loc",
    "req_slot",
    "seq_len",
    "qo_indptr",
    "kv_indptr",
    "kv_last_page_len",
    "kv_indices",
)


@dataclass(frozen=True)
class JoinArrays:
    """Sampling parameters of the requests that join at this step, on the device (bit-cast from int32)."""

    slot: torch.Tensor  # int32 [j]
    temperature: torch.Tensor  # float32 [j]
    top_p: torch.Tensor  # float32 [j]
    top_k: torch.Tensor  # int32 [j]
    seed: torch.Tensor  # int64 [j]: the uint64 seed's bits


@dataclass(frozen=True)
class ForwardBatch:
    """Device tensors are int32 views into one buffer; sizes are plain ints known on the host.

    For a padded decode batch `num_reqs` and `num_tokens` count the padding rows too: they are what the
    kernels see. The `host_*` tensors are CPU views of the pinned staging buffer (FlashInfer plans from them).
    """

    kind: int
    num_reqs: int
    num_tokens: int
    max_qo_len: int
    max_seq_len: int
    input_ids: torch.Tensor  # [t]; negative entries are resolved by the runner before the forward
    positions: torch.Tensor  # [t]
    out_loc: torch.Tensor  # [t]
    req_slot: torch.Tensor  # [n]
    seq_len: torch.Tensor  # [n]
    qo_indptr: torch.Tensor  # [n + 1]
    kv_indptr: torch.Tensor  # [n + 1]
    kv_last_page_len: torch.Tensor  # [n]
    kv_indices: torch.Tensor  # [k]
    host_qo_indptr: torch.Tensor
    host_kv_indptr: torch.Tensor
    host_kv_last_page_len: torch.Tensor
    host_seq_len: torch.Tensor
    joins: JoinArrays | None = None
    in_static_buffer: bool = True  # False when the step outgrew the fixed device buffer

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_reqs


class BatchUploader:
    """Packs a step's arrays into a pinned staging buffer and copies it to a fixed device buffer in one
    transfer.

    The copy is asynchronous, so a staging buffer may be rewritten only once the copies out of it have run:
    this one, and those that FlashInfer's plan() makes from the `host_*` views. With several steps in flight
    each one gets its own staging buffer, taken round-robin; `finish()`, called once the step has queued all
    its work, records an event that is waited on before the buffer is used again (a no-op when the step has
    long completed). The
    device buffer is shared by every step: all work runs on one stream, so a step's copy into it is ordered
    after every kernel of the steps launched before.
    """

    def __init__(self, capacity: int, device: torch.device, depth: int = 2) -> None:
        self.device = device
        self.depth = depth
        self._on_gpu = device.type == "cuda"
        self._turn = 0
        self._current = 0
        self._allocate(capacity)
        self.static = torch.zeros(capacity, dtype=torch.int32, device=device)

    def _allocate(self, capacity: int) -> None:
        self._staging = [
            torch.empty(capacity, dtype=torch.int32, pin_memory=self._on_gpu) for _ in range(self.depth)
        ]
        self._staging_np = [s.numpy() for s in self._staging]
        self._copied = [torch.cuda.Event() if self._on_gpu else None for _ in range(self.depth)]

    def upload(self, step, padding: DecodePadding | None = None) -> ForwardBatch:
        arrays = padded_arrays(step, _PACKED, padding)
        sizes = [a.shape[0] for a in arrays]
        joins = _join_parts(step)
        # The seed pairs are viewed as int64 on the device, so they must start on an 8-byte boundary.
        base = sum(sizes)
        align = base % 2
        total = base + align + sum(p.shape[0] for p in joins)
        if total > self._staging_np[0].shape[0]:
            # Rare (prefix-shared pages listed by many requests). Every staging buffer is replaced; the old
            # ones stay alive for as long as a pending copy (holding a reference) needs them.
            self._allocate(2 * total)
        turn = self._current = self._turn
        self._turn = (turn + 1) % self.depth
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        staging, staging_np = self._staging[turn], self._staging_np[turn]
        np.concatenate(arrays, out=staging_np[:base], casting="same_kind")
        offset = base + align
        for part in joins:
            staging_np[offset : offset + part.shape[0]] = part
            offset += part.shape[0]

        in_static = total <= self.static.shape[0]
        if not self._on_gpu:
            # No copy at all: the forward reads the staging buffer directly, and it is done with it before
            # the buffer comes round again.
            flat = staging[:total]
        elif in_static:
            flat = self.static[:total]
            flat.copy_(staging[:total], non_blocking=True)
        else:
            flat = staging[:total].to(self.device, non_blocking=True)

        parts = dict(zip(_PACKED, torch.split(flat[:base], sizes), strict=True))
        host = dict(zip(_PACKED, torch.split(staging[:base], sizes), strict=True))
        qo_indptr, seq_len = arrays[_PACKED.index("qo_indptr")], arrays[_PACKED.index("seq_len")]
        n, t = sizes[_PACKED.index("req_slot")], sizes[_PACKED.index("input_ids")]
        return ForwardBatch(
            kind=int(step.kind),
            num_reqs=n,
            num_tokens=t,
            max_qo_len=int(np.max(np.diff(qo_indptr))) if n else 0,
            max_seq_len=int(np.max(seq_len)) if n else 0,
            host_qo_indptr=host["qo_indptr"],
            host_kv_indptr=host["kv_indptr"],
            host_kv_last_page_len=host["kv_last_page_len"],
            host_seq_len=host["seq_len"],
            joins=_join_tensors(flat[base + align :], len(step.join_slot)) if len(joins[0]) else None,
            in_static_buffer=in_static,
            **parts,
        )

    def finish(self) -> None:
        """Marks the last uploaded step's staging buffer as read by everything queued so far."""
        if self._copied[self._current] is not None:
            self._copied[self._current].record()


def _join_parts(step) -> list[np.ndarray]:
    """The join arrays as int32 words: seeds first (two words each, kept 8-byte aligned), then the rest."""
    return [
        np.ascontiguousarray(step.join_seed, dtype=np.uint64).view(np.int32),
        np.asarray(step.join_slot, dtype=np.int32),
        np.ascontiguousarray(step.join_temperature, dtype=np.float32).view(np.int32),
        np.ascontiguousarray(step.join_top_p, dtype=np.float32).view(np.int32),
        np.asarray(step.join_top_k, dtype=np.int32),
    ]


def _join_tensors(flat: torch.Tensor, j: int) -> JoinArrays:
    seed, slot, temperature, top_p, top_k = torch.split(flat[: 6 * j], [2 * j, j, j, j, j])
    return JoinArrays(
        slot=slot,
        temperature=temperature.view(torch.float32),
        top_p=top_p.view(torch.float32),
        top_k=top_k,
        seed=seed.view(torch.int64),
    )
