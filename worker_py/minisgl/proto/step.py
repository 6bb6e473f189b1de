"""What one ring slot holds (docs/protocol.md, "Step slot" and "Result slot"), as numpy views.

The offsets follow from the ring's capacities alone, by the same rule as proto/src/step.rs: a 64-byte slot
header, then each array on the next 64-byte boundary after the previous one ends. Each slot's arrays are
listed once, in `STEP_ARRAYS` and `RESULT_ARRAYS` (name, dtype, basis): everything else here is derived from
those tables, and the golden test checks them against the Rust tables (proto/testdata/slot_layout.json) and
the tables of docs/protocol.md.

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
MAX_LOGIT_BIAS = 300  # logit-bias entries per request (OpenAI's bound); a step has room for R of them
MAX_TOP_LOGPROBS = 20  # top logprobs per sampled token (OpenAI's bound)

STEP_EXTEND = 0
STEP_DECODE = 1
STEP_SHUTDOWN = 2

RESULT_OK = 0
RESULT_FAILED = 1

I32 = np.dtype("<i4")
U32 = np.dtype("<u4")
F32 = np.dtype("<f4")
U64 = np.dtype("<u8")

# The step slot's arrays, in protocol order: name, dtype, basis (the used length's name; see BASES).
STEP_ARRAYS: tuple[tuple[str, np.dtype, str], ...] = (
    ("req_slot", I32, "n"),
    ("seq_len", I32, "n"),
    ("qo_indptr", I32, "n+1"),
    ("kv_indptr", I32, "n+1"),
    ("kv_last_page_len", I32, "n"),
    ("input_ids", I32, "t"),
    ("positions", I32, "t"),
    ("out_loc", I32, "t"),
    ("kv_indices", I32, "k"),
    ("join_slot", I32, "j"),
    ("join_temperature", F32, "j"),
    ("join_top_p", F32, "j"),
    ("join_top_k", I32, "j"),
    ("join_seed", U64, "j"),
    ("join_min_p", F32, "j"),
    ("join_presence_penalty", F32, "j"),
    ("join_frequency_penalty", F32, "j"),
    ("join_repetition_penalty", F32, "j"),
    ("join_prompt_len", I32, "j"),
    ("join_logprobs", I32, "j"),
    ("join_bias_indptr", I32, "j+1"),
    ("join_bias_ids", I32, "b"),
    ("join_bias_values", F32, "b"),
    ("mask_row", I32, "n"),  # per request: its row of mask_bits, or -1
    ("mask_bits", U32, "g*W"),  # g token masks of W words; bit i % 32 of word i // 32 set: token i allowed
    ("logprob_target", I32, "u"),  # per new token: the token whose logprob its logits give back, or -1
)

# The result slot's arrays. `l` is n when the header's `logprobs` is 1, else 0; `m` is its `num_top`; `p` its
# prompt-logprob entries (one per step position with a target), `q` their top count.
RESULT_ARRAYS: tuple[tuple[str, np.dtype, str], ...] = (
    ("tokens", I32, "n"),
    ("logprob", F32, "l"),
    ("top_ids", I32, "l*m"),
    ("top_logprobs", F32, "l*m"),
    ("prompt_logprob", F32, "p"),
    ("prompt_top_ids", I32, "p*q"),
    ("prompt_top_logprobs", F32, "p*q"),
)

# basis -> the capacity it is laid out with (its name in the protocol, and its value).
BASES = {
    "n": ("R", lambda c: c.max_reqs),
    "n+1": ("R+1", lambda c: c.max_reqs + 1),
    "t": ("T", lambda c: c.max_tokens),
    "k": ("K", lambda c: c.max_kv_indices),
    "j": ("R", lambda c: c.max_reqs),
    "j+1": ("R+1", lambda c: c.max_reqs + 1),
    "b": ("R*300", lambda c: c.max_reqs * MAX_LOGIT_BIAS),
    "l": ("R", lambda c: c.max_reqs),
    "l*m": ("R*20", lambda c: c.max_reqs * MAX_TOP_LOGPROBS),
    "g*W": ("R*W", lambda c: c.max_reqs * c.mask_words),
    "u": ("T", lambda c: c.max_tokens),  # t when the step asks for prompt logprobs, else 0
    "p": ("T", lambda c: c.max_tokens),
    "p*q": ("T*20", lambda c: c.max_tokens * MAX_TOP_LOGPROBS),
}
# The step header's counts, in the order `_STEP_USED` lists them for the bases that cut step arrays.
_STEP_BASES = ("n", "n+1", "t", "k", "j", "j+1", "b", "g*W", "u")

# step_id u64, kind u32, n u32, t u32, k u32, j u32, b u32, g u32, prompt_logprobs u32, prompt_top u32
_STEP_HEADER = struct.Struct("<QIIIIIIIII")
# step_id u64, n u32, status u32, logprobs u32, num_top u32, num_prompt u32, prompt_top u32
_RESULT_HEADER = struct.Struct("<QIIIIII")


@dataclass(frozen=True)
class Capacity:
    """How many requests (R), tokens (T) and KV page indices (K) one slot can describe, and the 32-bit
    words of one token mask (W = ceil(vocab / 32); 0 leaves no room for masks)."""

    max_reqs: int
    max_tokens: int
    max_kv_indices: int
    mask_words: int = 0


@dataclass(frozen=True)
class ArraySpec:
    name: str
    offset: int
    length: int  # entries at full capacity
    dtype: np.dtype
    used_by: str  # the basis: which header count cuts it (a key of BASES: "n", "t", "g*W", "l*m", ...)

    @property
    def nbytes(self) -> int:
        return self.length * self.dtype.itemsize

    @property
    def capacity(self) -> str:
        return BASES[self.used_by][0]


def _place(table, cap: Capacity) -> tuple[tuple[ArraySpec, ...], int]:
    out = []
    end = SLOT_HEADER_BYTES
    for name, dtype, basis in table:
        start = -(-end // ALIGN) * ALIGN
        length = BASES[basis][1](cap)
        out.append(ArraySpec(name, start, length, dtype, basis))
        end = start + length * dtype.itemsize
    return tuple(out), -(-end // ALIGN) * ALIGN


class StepLayout:
    """Byte offsets of a step slot's arrays, in protocol order."""

    def __init__(self, cap: Capacity):
        self.cap = cap
        self.arrays, self.slot_bytes = _place(STEP_ARRAYS, cap)
        self.by_name = {a.name: a for a in self.arrays}


class ResultLayout:
    """Byte offsets of a result slot's arrays; R and T matter to it (K and W do not)."""

    def __init__(self, cap: Capacity):
        self.max_reqs = cap.max_reqs
        self.max_tokens = cap.max_tokens
        self.cap = Capacity(cap.max_reqs, cap.max_tokens, 0, 0)
        self.arrays, self.slot_bytes = _place(RESULT_ARRAYS, self.cap)
        self.by_name = {a.name: a for a in self.arrays}
        self.tokens = self.by_name["tokens"]


def _as_bytes(buf) -> np.ndarray:
    """A writable-if-possible uint8 view of any buffer (mmap, bytearray, numpy array, memoryview)."""
    if isinstance(buf, np.ndarray):
        return buf.view(np.uint8).reshape(-1)
    return np.frombuffer(buf, dtype=np.uint8)


def _views(layout, buf) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    raw = _as_bytes(buf)
    if raw.nbytes < layout.slot_bytes:
        raise ValueError(f"slot buffer of {raw.nbytes} bytes, the layout needs {layout.slot_bytes}")
    raw = raw[: layout.slot_bytes]
    return raw, {a.name: raw[a.offset : a.offset + a.nbytes].view(a.dtype) for a in layout.arrays}


class StepView:
    """One step, each array cut to the length its header gives. Views into the slot: valid until release.

    `StepView(layout, buf)` parses any buffer from scratch (a few microseconds); on a ring, `StepReader` (or a
    `StepSlot` per slot) gives the same view from precomputed arrays in a fraction of that.
    """

    __slots__ = (
        "step_id",
        "kind",
        "num_reqs",
        "num_tokens",
        "num_kv_indices",
        "num_joins",
        "num_bias",
        "num_masks",
        "prompt_logprobs",
        "prompt_top",
        *(name for name, _, _ in STEP_ARRAYS),
    )

    def __init__(self, layout: StepLayout, buf):
        StepSlot(layout, buf).fill(self)

    def __repr__(self) -> str:
        return (
            f"StepView(step_id={self.step_id}, kind={self.kind}, n={self.num_reqs}, t={self.num_tokens}, "
            f"k={self.num_kv_indices}, j={self.num_joins}, b={self.num_bias}, g={self.num_masks})"
        )


class StepSlot:
    """Full-capacity views over one step slot buffer, built once; `view()` is the per-step part.

    Each array is also an attribute of the slot, at full capacity (`slot.input_ids`).
    """

    def __init__(self, layout: StepLayout, buf):
        self.layout = layout
        self.raw, full = _views(layout, buf)
        # memoryview for struct.unpack_from: one call reads the whole fixed header.
        self._mem = memoryview(self.raw)
        for name, arr in full.items():
            setattr(self, name, arr)
        self._cuts = tuple((a.name, full[a.name], _STEP_BASES.index(a.used_by)) for a in layout.arrays)

    def view(self) -> StepView:
        """The step now in this slot."""
        return self.fill(StepView.__new__(StepView))

    def fill(self, v: StepView) -> StepView:
        step_id, kind, n, t, k, j, b, g, plp, ptop = _STEP_HEADER.unpack_from(self._mem, 0)
        v.step_id, v.kind, v.num_reqs, v.num_tokens, v.num_kv_indices, v.num_joins, v.num_bias = (
            step_id,
            kind,
            n,
            t,
            k,
            j,
            b,
        )
        v.num_masks = g
        v.prompt_logprobs, v.prompt_top = plp, ptop
        used = (n, n + 1, t, k, j, j + 1, b, g * self.layout.cap.mask_words, t if plp else 0)
        for name, full, basis in self._cuts:
            setattr(v, name, full[: used[basis]])
        return v

    def write_header(
        self,
        step_id: int,
        kind: int,
        num_reqs: int,
        num_tokens: int,
        num_kv: int,
        num_joins: int,
        num_bias: int = 0,
        num_masks: int = 0,
        prompt_logprobs: int = 0,
        prompt_top: int = 0,
    ):
        """Sets the fixed header (tests and tools that play the scheduler; the worker never writes steps)."""
        _STEP_HEADER.pack_into(
            self._mem,
            0,
            step_id,
            kind,
            num_reqs,
            num_tokens,
            num_kv,
            num_joins,
            num_bias,
            num_masks,
            prompt_logprobs,
            prompt_top,
        )


@dataclass(frozen=True)
class Logprobs:
    """What a step returns beside its tokens when a request of it asked for logprobs: for each of its n
    requests, the sampled token's logprob and the m most likely tokens' ids and logprobs (m may be 0)."""

    logprob: np.ndarray  # float32 [n]
    top_ids: np.ndarray  # int32 [n, m]
    top_logprobs: np.ndarray  # float32 [n, m]


@dataclass(frozen=True)
class PromptLogprobs:
    """What a step that asked for prompt logprobs returns: for each of its p positions with a target (in
    step order), the target's logprob and the q most likely tokens' ids and logprobs there (q may be 0)."""

    logprob: np.ndarray  # float32 [p]
    top_ids: np.ndarray  # int32 [p, q]
    top_logprobs: np.ndarray  # float32 [p, q]


class ResultSlot:
    """Views over one result slot buffer, built once; `write()` is the per-step part."""

    def __init__(self, layout: ResultLayout, buf):
        self.layout = layout
        self.raw, full = _views(layout, buf)
        self._mem = memoryview(self.raw)
        self.tokens = full["tokens"]
        self.logprob = full["logprob"]
        self.top_ids = full["top_ids"]
        self.top_logprobs = full["top_logprobs"]
        self.prompt_logprob = full["prompt_logprob"]
        self.prompt_top_ids = full["prompt_top_ids"]
        self.prompt_top_logprobs = full["prompt_top_logprobs"]

    def write(
        self,
        step_id: int,
        tokens: np.ndarray | None,
        status: int = RESULT_OK,
        logprobs: Logprobs | None = None,
        prompt: PromptLogprobs | None = None,
    ) -> None:
        """Writes the sampled token of each request, in the step's request order, and their logprobs when
        given, and the prompt logprobs the step asked for. `tokens` may be None for a failed step (then n is
        0)."""
        n = 0 if tokens is None else len(tokens)
        if n > self.layout.max_reqs:
            raise ValueError(f"{n} tokens, the result slot holds {self.layout.max_reqs}")
        if n:
            self.tokens[:n] = tokens
        has_logprobs, m = 0, 0
        if logprobs is not None and n:
            m = logprobs.top_ids.shape[1]
            if m > MAX_TOP_LOGPROBS or logprobs.logprob.shape[0] != n:
                raise ValueError(f"logprobs for {logprobs.logprob.shape[0]} rows, {m} top; expected {n} rows")
            self.logprob[:n] = logprobs.logprob
            self.top_ids[: n * m] = logprobs.top_ids.reshape(-1)
            self.top_logprobs[: n * m] = logprobs.top_logprobs.reshape(-1)
            has_logprobs = 1
        p, q = 0, 0
        if prompt is not None and n:
            p, q = prompt.top_ids.shape
            if q > MAX_TOP_LOGPROBS or p > self.layout.max_tokens or prompt.logprob.shape[0] != p:
                raise ValueError(f"{prompt.logprob.shape[0]} prompt logprobs, {p} rows of {q} top")
            self.prompt_logprob[:p] = prompt.logprob
            self.prompt_top_ids[: p * q] = prompt.top_ids.reshape(-1)
            self.prompt_top_logprobs[: p * q] = prompt.top_logprobs.reshape(-1)
        _RESULT_HEADER.pack_into(self._mem, 0, step_id, n, status, has_logprobs, m, p, q)

    def read(self) -> tuple[int, int, np.ndarray]:
        """(step_id, status, tokens[:n]); tokens is a view into the slot."""
        step_id, n, status, *_ = _RESULT_HEADER.unpack_from(self._mem, 0)
        return step_id, status, self.tokens[:n]

    def read_logprobs(self) -> Logprobs | None:
        """The logprobs the slot carries (views into it), or None."""
        _, n, _, has_logprobs, m, _, _ = _RESULT_HEADER.unpack_from(self._mem, 0)
        if not has_logprobs:
            return None
        return Logprobs(
            self.logprob[:n], self.top_ids[: n * m].reshape(n, m), self.top_logprobs[: n * m].reshape(n, m)
        )

    def read_prompt_logprobs(self) -> PromptLogprobs | None:
        """The prompt logprobs the slot carries (views into it), or None when it carries none."""
        *_, p, q = _RESULT_HEADER.unpack_from(self._mem, 0)
        if not p:
            return None
        return PromptLogprobs(
            self.prompt_logprob[:p],
            self.prompt_top_ids[: p * q].reshape(p, q),
            self.prompt_top_logprobs[: p * q].reshape(p, q),
        )


def write_result(
    layout: ResultLayout,
    buf,
    step_id: int,
    tokens: np.ndarray,
    status: int = RESULT_OK,
    logprobs: Logprobs | None = None,
    prompt: PromptLogprobs | None = None,
) -> None:
    """One-off form of `ResultSlot.write` (for a ring, keep a `ResultSlot` per slot)."""
    ResultSlot(layout, buf).write(step_id, tokens, status, logprobs, prompt)


def read_result(layout: ResultLayout, buf) -> tuple[int, int, np.ndarray]:
    """One-off form of `ResultSlot.read`: (step_id, status, tokens)."""
    return ResultSlot(layout, buf).read()
