"""One step's arrays on the device, and the host-side sizes that shape the step's kernels."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from minisgl.proto.step import STEP_ARRAYS
from minisgl.worker.padding import Padding, pack, padded_sizes

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
_TOKENS, _REQS, _SEQ_LEN = (_PACKED.index(name) for name in ("input_ids", "req_slot", "seq_len"))


# The join arrays (docs/protocol.md: those cut by j, j + 1 or b), in the order they follow the packed arrays
# as int32 words: the 8-byte ones first, so that they stay 8-byte aligned on the device.
_JOINED = tuple(
    sorted(
        ((name, dtype) for name, dtype, basis in STEP_ARRAYS if basis in ("j", "j+1", "b")),
        key=lambda a: a[1].itemsize != 8,
    )
)
_JOINED_INDEX = {name.removeprefix("join_"): i for i, (name, _) in enumerate(_JOINED)}
_TORCH_VIEW = {"<i4": None, "<f4": torch.float32, "<u8": torch.int64}


class _Words:
    """A device array of the batch, cut out of its uploaded words when first read. A step replayed from a
    graph reads none of them (the graph reads fixed addresses), and cutting nine views on every step cost
    more host time than anything else in the upload but the packing (issue 12)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._index = _PACKED.index(name)

    def __get__(self, batch: ForwardBatch | None, owner: type | None = None) -> torch.Tensor:
        if batch is None:
            return self
        return batch._device[self._index]


@dataclass(frozen=True)
class ForwardBatch:
    """Device tensors are int32 views into one buffer; sizes are plain ints known on the host.

    For a padded decode batch `num_reqs` and `num_tokens` count the padding rows too: they are what the
    kernels see. The `host_*` tensors are CPU views of the pinned staging buffer (FlashInfer plans from them);
    they, the device views and the longest lengths are worked out when first asked for: a decode step
    replayed from a graph plans nothing, and every microsecond of its host path counts (issue 12).
    """

    kind: int
    num_reqs: int
    num_tokens: int
    words: torch.Tensor  # the `_PACKED` arrays one after another on the device, at `sizes`
    host_packed: torch.Tensor  # the same words in the staging buffer
    sizes: tuple[int, ...]
    # The join arrays' int32 words on the device, in `_JOINED` order at `join_sizes`; `joins` views them.
    join_words: torch.Tensor | None = None
    join_sizes: tuple[int, ...] = ()
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # `upload_joins`' extra int32 arrays
    in_static_buffer: bool = True  # False when the step outgrew the fixed device buffer

    input_ids = _Words()  # [t]; negative entries are resolved by the runner before the forward
    positions = _Words()  # [t]
    out_loc = _Words()  # [t]
    req_slot = _Words()  # [n]
    seq_len = _Words()  # [n]
    qo_indptr = _Words()  # [n + 1]
    kv_indptr = _Words()  # [n + 1]
    kv_last_page_len = _Words()  # [n]
    kv_indices = _Words()  # [k]

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == self.num_reqs

    @functools.cached_property
    def _device(self) -> tuple[torch.Tensor, ...]:
        return self.words.split_with_sizes(self.sizes)

    @functools.cached_property
    def joins(self) -> JoinViews | None:
        """The join arrays on the device (`JoinViews`), or None when nobody joins. Made when first asked for:
        only the sampling reads them, after the forward is queued."""
        return None if self.join_words is None else JoinViews(self.join_words, self.join_sizes)

    @functools.cached_property
    def _host(self) -> dict[str, torch.Tensor]:
        return dict(zip(_PACKED, torch.split(self.host_packed, self.sizes), strict=True))

    @property
    def host_qo_indptr(self) -> torch.Tensor:
        return self._host["qo_indptr"]

    @property
    def host_kv_indptr(self) -> torch.Tensor:
        return self._host["kv_indptr"]

    @property
    def host_kv_last_page_len(self) -> torch.Tensor:
        return self._host["kv_last_page_len"]

    @property
    def host_seq_len(self) -> torch.Tensor:
        return self._host["seq_len"]

    @functools.cached_property
    def max_qo_len(self) -> int:
        return int(np.max(np.diff(self.host_qo_indptr.numpy()))) if self.num_reqs else 0

    @functools.cached_property
    def max_seq_len(self) -> int:
        # Read in place: a small decode step with short-context graphs asks this of every step.
        start = sum(self.sizes[:_SEQ_LEN])
        return int(self.host_packed.numpy()[start : start + self.num_reqs].max()) if self.num_reqs else 0


class JoinViews:
    """The join arrays on the device, named as the protocol's without `join_` (uint64 seeds as int64 bits),
    each viewed out of the uploaded words when first read: a step reads a few of them, and viewing all a
    dozen took more host time than the parameters' writes themselves (issue 12)."""

    def __init__(self, words: torch.Tensor, sizes: tuple[int, ...]) -> None:
        self._words = words
        self._sizes = sizes

    def __getattr__(self, name: str) -> torch.Tensor:
        i = _JOINED_INDEX.get(name)
        if i is None:
            raise AttributeError(name)
        start = sum(self._sizes[:i])
        words = self._words[start : start + self._sizes[i]]
        view = _TORCH_VIEW[_JOINED[i][1].str]
        value = words if view is None else words.view(view)
        setattr(self, name, value)  # read once
        return value


class BatchUploader:
    """Packs a step's arrays into a pinned staging buffer and copies them to a fixed device buffer, in two
    transfers: the forward's arrays (`upload`), then the join parameters and the sampling's extra arrays
    (`upload_joins`), which only the sampling reads, so that packing them waits until the forward is queued
    (issue 12: the host time before a small prefill's replay delays its result).

    The copies are asynchronous, so a staging buffer may be rewritten only once the copies out of it have
    run: these, and those that FlashInfer's plan() makes from the `host_*` views. With several steps in
    flight each one gets its own staging buffer, taken round-robin; `finish()`, called once the step has
    queued all its work, records an event that is waited on before the buffer is used again (a no-op when
    the step has long completed). The device buffer is shared by every step: all work runs on one stream, so
    a step's copies into it are ordered after every kernel of the steps launched before.
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

    def upload(self, step, padding: Padding | None = None) -> ForwardBatch:
        """The step's forward arrays, padded for a graph when `padding` is given. The joins and what only the
        sampling reads come with `upload_joins`."""
        sizes = padded_sizes(step, _PACKED, padding)
        total = sum(sizes)
        if total > self._staging_np[0].shape[0]:
            # Rare (prefix-shared pages listed by many requests). Every staging buffer is replaced; the old
            # ones stay alive for as long as a pending copy (holding a reference) needs them.
            self._allocate(2 * total)
        turn = self._current = self._turn
        self._turn = (turn + 1) % self.depth
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        pack(step, _PACKED, padding, self._staging_np[turn][:total])
        words, in_static = self._copy(0, total)
        return ForwardBatch(
            kind=int(step.kind),
            num_reqs=sizes[_REQS],
            num_tokens=sizes[_TOKENS],
            words=words,
            host_packed=self._staging[turn][:total],
            sizes=tuple(sizes),
            in_static_buffer=in_static,
        )

    def upload_joins(
        self, batch: ForwardBatch, step, extra: dict[str, np.ndarray] | None = None
    ) -> ForwardBatch:
        """`batch` with the step's join arrays and the `extra` arrays the sampling reads, copied after the
        forward's (into the same staging buffer and the device buffer past them); `batch` itself when there
        are none."""
        joins = _join_parts(step)
        extra = _int32(extra)
        if not joins and not extra:
            return batch
        used = sum(batch.sizes)
        # The seed pairs are viewed as int64 on the device, so they must start on an 8-byte boundary.
        start = used + used % 2
        total = start + sum(p.shape[0] for p in joins) + sum(a.shape[0] for a in extra.values())
        if total > self._staging_np[0].shape[0]:
            self._allocate(2 * total)  # only this copy reads the new buffers: the forward's has its own
        _fill(self._staging_np[self._current], start, [*joins, *extra.values()])
        flat, in_static = self._copy(start, total)
        words = sum(_sizes(joins))
        return replace(
            batch,
            join_words=flat[:words] if joins else None,
            join_sizes=_sizes(joins),
            extra=_split(flat[words:], extra),
            in_static_buffer=batch.in_static_buffer and in_static,
        )

    def _copy(self, start: int, end: int) -> tuple[torch.Tensor, bool]:
        """Words start:end of the current staging buffer on the device: at the same offsets of the fixed
        buffer when they fit it, else in a new tensor. Returns the device words and whether they fit."""
        staging = self._staging[self._current]
        in_static = end <= self.static.shape[0]
        if not self._on_gpu:
            # No copy at all: the forward reads the staging buffer directly, and it is done with it before
            # the buffer comes round again.
            return staging[start:end], in_static
        if in_static:
            flat = self.static[start:end]
            flat.copy_(staging[start:end], non_blocking=True)
            return flat, True
        return staging[start:end].to(self.device, non_blocking=True), False

    def finish(self) -> None:
        """Marks the last uploaded step's staging buffer as read by everything queued so far."""
        if self._copied[self._current] is not None:
            self._copied[self._current].record()


def _int32(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    return {name: np.asarray(a, dtype=np.int32) for name, a in (arrays or {}).items()}


def _fill(out: np.ndarray, offset: int, parts) -> None:
    """Writes `parts` one after another into `out` from `offset`."""
    for part in parts:
        out[offset : offset + part.shape[0]] = part
        offset += part.shape[0]


def _join_parts(step) -> list[np.ndarray]:
    """The join arrays as int32 words, in `_JOINED` order; none when nobody joins."""
    if len(step.join_slot) == 0:
        return []
    return [np.ascontiguousarray(getattr(step, name), dtype=dtype).view(np.int32) for name, dtype in _JOINED]


def _split(flat: torch.Tensor, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    if not arrays:
        return {}
    return dict(zip(arrays, torch.split(flat, [a.shape[0] for a in arrays.values()]), strict=True))


def _sizes(parts: list[np.ndarray]) -> tuple[int, ...]:
    return tuple(p.shape[0] for p in parts)
