"""What one ring slot holds (docs/protocol.md, "Step slot" and "Result slot"), as numpy views.

The offsets follow from the ring's capacities alone, by the same rule as proto/src/step.rs: a 64-byte slot
header, then each array on the next 64-byte boundary after the previous one ends.

Reading a step is per step, so the cost is split: `StepSlot` builds full-capacity views over one slot
buffer once (per ring slot, at startup), and `StepSlot.view()` only reads the 64-byte header and cuts each
array to its used length. The arrays are views into shared memory: copy what you need before releasing
the slot.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

ALIGN = 64
SLOT_HEADER_BYTES = 64

STEP_EXTEND = 0
STEP_DECODE = 1
STEP_SHUTDOWN = 2

RESULT_OK = 0
RESULT_FAILED = 1

I32 = np.dtype("<i4")
F32 = np.dtype("<f4")
U64 = np.dtype("<u8")

# step_id u64, kind u32, n u32, t u32, k u32, j u32
_STEP_HEADER = struct.Struct("<QIIIII")
# step_id u64, n u32, status u32
_RESULT_HEADER = struct.Struct("<QII")


@dataclass(frozen=True)
class Capacity:
    """How many requests (R), tokens (T) and KV page indices (K) one slot can describe."""

    max_reqs: int
    max_tokens: int
    max_kv_indices: int


@dataclass(frozen=True)
class ArraySpec:
    name: str
    offset: int
    length: int  # entries at full capacity
    dtype: np.dtype
    used_by: str  # which header count cuts it: "n", "n+1", "t", "k" or "j"

    @property
    def nbytes(self) -> int:
        return self.length * self.dtype.itemsize


def _place(specs: list[tuple[str, int, np.dtype, str]]) -> tuple[tuple[ArraySpec, ...], int]:
    out = []
    end = SLOT_HEADER_BYTES
    for name, length, dtype, used_by in specs:
        start = -(-end // ALIGN) * ALIGN
        out.append(ArraySpec(name, start, length, dtype, used_by))
        end = start + length * dtype.itemsize
    return tuple(out), -(-end // ALIGN) * ALIGN


class StepLayout:
    """Byte offsets of a step slot's arrays, in protocol order."""

    def __init__(self, cap: Capacity):
        r, t, k = cap.max_reqs, cap.max_tokens, cap.max_kv_indices
        self.cap = cap
        self.arrays, self.slot_bytes = _place(
            [
                ("req_slot", r, I32, "n"),
                ("seq_len", r, I32, "n"),
                ("qo_indptr", r + 1, I32, "n+1"),
                ("kv_indptr", r + 1, I32, "n+1"),
                ("kv_last_page_len", r, I32, "n"),
                ("input_ids", t, I32, "t"),
                ("positions", t, I32, "t"),
                ("out_loc", t, I32, "t"),
                ("kv_indices", k, I32, "k"),
                ("join_slot", r, I32, "j"),
                ("join_temperature", r, F32, "j"),
                ("join_top_p", r, F32, "j"),
                ("join_top_k", r, I32, "j"),
                ("join_seed", r, U64, "j"),
            ]
        )
        self.by_name = {a.name: a for a in self.arrays}


class ResultLayout:
    """Byte offsets of a result slot: the header, then `tokens` i32[R]."""

    def __init__(self, max_reqs: int):
        self.max_reqs = max_reqs
        (self.tokens,), self.slot_bytes = _place([("tokens", max_reqs, I32, "n")])


def _as_bytes(buf) -> np.ndarray:
    """A writable-if-possible uint8 view of any buffer (mmap, bytearray, numpy array, memoryview)."""
    if isinstance(buf, np.ndarray):
        return buf.view(np.uint8).reshape(-1)
    return np.frombuffer(buf, dtype=np.uint8)


class StepView:
    """One step, each array cut to the length its header gives. Views into the slot: valid until release.

    `StepView(layout, buf)` parses any buffer from scratch (a few microseconds); on a ring, `StepReader` (or a
    `StepSlot` per slot) gives the same view from precomputed arrays in about a third of that.
    """

    __slots__ = (
        "step_id",
        "kind",
        "num_reqs",
        "num_tokens",
        "num_kv_indices",
        "num_joins",
        "req_slot",
        "seq_len",
        "qo_indptr",
        "kv_indptr",
        "kv_last_page_len",
        "input_ids",
        "positions",
        "out_loc",
        "kv_indices",
        "join_slot",
        "join_temperature",
        "join_top_p",
        "join_top_k",
        "join_seed",
    )

    def __init__(self, layout: StepLayout, buf):
        StepSlot(layout, buf).fill(self)

    def __repr__(self) -> str:
        return (
            f"StepView(step_id={self.step_id}, kind={self.kind}, n={self.num_reqs}, t={self.num_tokens}, "
            f"k={self.num_kv_indices}, j={self.num_joins})"
        )


class StepSlot:
    """Full-capacity views over one step slot buffer, built once; `view()` is the per-step part."""

    # Full-capacity arrays, set in __init__ (typed here for readers and linters).
    req_slot: np.ndarray
    seq_len: np.ndarray
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_last_page_len: np.ndarray
    input_ids: np.ndarray
    positions: np.ndarray
    out_loc: np.ndarray
    kv_indices: np.ndarray
    join_slot: np.ndarray
    join_temperature: np.ndarray
    join_top_p: np.ndarray
    join_top_k: np.ndarray
    join_seed: np.ndarray

    def __init__(self, layout: StepLayout, buf):
        raw = _as_bytes(buf)
        if raw.nbytes < layout.slot_bytes:
            raise ValueError(f"slot buffer of {raw.nbytes} bytes, the layout needs {layout.slot_bytes}")
        self.layout = layout
        self.raw = raw[: layout.slot_bytes]
        # memoryview for struct.unpack_from: one call reads the whole fixed header.
        self._mem = memoryview(self.raw)
        for a in layout.arrays:
            setattr(self, a.name, self.raw[a.offset : a.offset + a.nbytes].view(a.dtype))

    def view(self) -> StepView:
        """The step now in this slot."""
        return self.fill(StepView.__new__(StepView))

    def fill(self, v: StepView) -> StepView:
        step_id, kind, n, t, k, j = _STEP_HEADER.unpack_from(self._mem, 0)
        v.step_id, v.kind, v.num_reqs, v.num_tokens, v.num_kv_indices, v.num_joins = step_id, kind, n, t, k, j
        v.req_slot = self.req_slot[:n]
        v.seq_len = self.seq_len[:n]
        v.qo_indptr = self.qo_indptr[: n + 1]
        v.kv_indptr = self.kv_indptr[: n + 1]
        v.kv_last_page_len = self.kv_last_page_len[:n]
        v.input_ids = self.input_ids[:t]
        v.positions = self.positions[:t]
        v.out_loc = self.out_loc[:t]
        v.kv_indices = self.kv_indices[:k]
        v.join_slot = self.join_slot[:j]
        v.join_temperature = self.join_temperature[:j]
        v.join_top_p = self.join_top_p[:j]
        v.join_top_k = self.join_top_k[:j]
        v.join_seed = self.join_seed[:j]
        return v

    def write_header(
        self, step_id: int, kind: int, num_reqs: int, num_tokens: int, num_kv: int, num_joins: int
    ):
        """Sets the fixed header (tests and tools that play the scheduler; the worker never writes steps)."""
        _STEP_HEADER.pack_into(self._mem, 0, step_id, kind, num_reqs, num_tokens, num_kv, num_joins)


class ResultSlot:
    """Views over one result slot buffer, built once; `write()` is the per-step part."""

    def __init__(self, layout: ResultLayout, buf):
        raw = _as_bytes(buf)
        if raw.nbytes < layout.slot_bytes:
            raise ValueError(f"slot buffer of {raw.nbytes} bytes, the layout needs {layout.slot_bytes}")
        self.layout = layout
        self.raw = raw[: layout.slot_bytes]
        self._mem = memoryview(self.raw)
        spec = layout.tokens
        self.tokens = self.raw[spec.offset : spec.offset + spec.nbytes].view(I32)

    def write(self, step_id: int, tokens: np.ndarray | None, status: int = RESULT_OK) -> None:
        """Writes the sampled token of each request, in the step's request order. `tokens` may be None for a
        failed step (then n is 0)."""
        n = 0 if tokens is None else len(tokens)
        if n > self.layout.max_reqs:
            raise ValueError(f"{n} tokens, the result slot holds {self.layout.max_reqs}")
        if n:
            self.tokens[:n] = tokens
        _RESULT_HEADER.pack_into(self._mem, 0, step_id, n, status)

    def read(self) -> tuple[int, int, np.ndarray]:
        """(step_id, status, tokens[:n]); tokens is a view into the slot."""
        step_id, n, status = _RESULT_HEADER.unpack_from(self._mem, 0)
        return step_id, status, self.tokens[:n]


def write_result(
    layout: ResultLayout, buf, step_id: int, tokens: np.ndarray, status: int = RESULT_OK
) -> None:
    """One-off form of `ResultSlot.write` (for a ring, keep a `ResultSlot` per slot)."""
    ResultSlot(layout, buf).write(step_id, tokens, status)


def read_result(layout: ResultLayout, buf) -> tuple[int, int, np.ndarray]:
    """One-off form of `ResultSlot.read`: (step_id, status, tokens)."""
    return ResultSlot(layout, buf).read()
