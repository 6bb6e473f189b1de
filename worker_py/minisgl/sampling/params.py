"""Sampling parameters of every request slot, kept on the device and mirrored on the host."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from types import SimpleNamespace

import numpy as np
import torch

from minisgl.proto.step import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

# A slot's token counts (penalties.py) keep "seen in the prompt" in this bit and the generated count below it.
PROMPT_SEEN = 1 << 24
COUNT_MASK = PROMPT_SEEN - 1

# Host flags per slot, OR-ed over a step's slots to plan it (one gather and one reduction): whether the
# request samples, samples through top-k/top-p, and which optional pass it needs (so that a step whose
# requests need none skips it).
_BIAS, _PENALTIES, _MIN_P, _SAMPLES, _FILTERS, _LOGPROBS = 1, 2, 4, 8, 16, 32


class SampleMode(enum.IntEnum):
    """The cheapest path that is exact for a batch; every path gives each row the same token."""

    GREEDY = 0  # every row has temperature 0: argmax only
    PLAIN = 1  # some rows sample, none filters: no sort
    FILTERED = 2  # some sampling row has top-k or top-p: one sort of the logits


@dataclass(frozen=True)
class SamplePlan:
    """What one step's sampling must do, decided on the host from its slots (nothing read from the device)."""

    mode: SampleMode = SampleMode.FILTERED
    bias: bool = False
    penalties: bool = False
    min_p: bool = False
    top_logprobs: int = -1  # -1: no row asked for logprobs; else the most top logprobs a row asked for

    @property
    def logprobs(self) -> bool:
        return self.top_logprobs >= 0

    @property
    def graphable(self) -> bool:
        """Whether a decode graph's sampling (one per mode, none of the optional passes) does all of it."""
        return not (self.bias or self.penalties or self.min_p or self.logprobs)


# The parameters a join carries beyond the first five, and their value when a caller leaves them out (off).
_OPTIONS = {
    "min_p": (np.float32, 0.0),
    "presence_penalty": (np.float32, 0.0),
    "frequency_penalty": (np.float32, 0.0),
    "repetition_penalty": (np.float32, 1.0),
    "prompt_len": (np.int32, 2**31 - 1),
    "logprobs": (np.int32, -1),
}


@dataclass
class Joins:
    """Sampling parameters of the requests joining at one step, host arrays of one entry per join: the step's
    `join_*` arrays (docs/protocol.md) without the prefix. `bias_indptr` has j + 1 entries."""

    slot: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    top_k: np.ndarray
    seed: np.ndarray
    min_p: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray
    repetition_penalty: np.ndarray
    prompt_len: np.ndarray
    logprobs: np.ndarray
    bias_indptr: np.ndarray
    bias_ids: np.ndarray
    bias_values: np.ndarray

    @classmethod
    def of_step(cls, step) -> Joins:
        """Views of a step's join arrays (a StepView, or anything with the same attributes)."""
        return cls(**{f.name: getattr(step, "join_" + f.name) for f in fields(cls)})

    @classmethod
    def make(cls, slots, temperature, top_p, top_k, seed, bias=None, **options) -> Joins:
        """From per-join arrays (broadcast from scalars) and `options` named as the fields, the rest off;
        `bias` is one list of (token id, bias) per join."""
        j = len(slots)

        def full(x, dtype) -> np.ndarray:
            return np.broadcast_to(np.asarray(x, dtype=dtype), (j,)).copy()

        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown sampling options {sorted(unknown)}")
        bias = bias if bias is not None else [[] for _ in range(j)]
        counts = [len(b) for b in bias]
        return cls(
            slot=full(slots, np.int32),
            temperature=full(temperature, np.float32),
            top_p=full(top_p, np.float32),
            top_k=full(top_k, np.int32),
            seed=full(seed, np.uint64),
            **{name: full(options.get(name, off), dtype) for name, (dtype, off) in _OPTIONS.items()},
            bias_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
            bias_ids=np.asarray([t for b in bias for t, _ in b], dtype=np.int32),
            bias_values=np.asarray([v for b in bias for _, v in b], dtype=np.float32),
        )

    def to_device(self, device: torch.device | str) -> SimpleNamespace:
        """The same arrays as device tensors, as the step upload provides them (seeds as int64 bits)."""

        def put(a: np.ndarray) -> torch.Tensor:
            a = np.ascontiguousarray(a)
            return torch.from_numpy(a.view(np.int64) if a.dtype == np.uint64 else a).to(device)

        return SimpleNamespace(**{f.name: put(getattr(self, f.name)) for f in fields(self)})


class SlotParams:
    """Every sampling parameter per slot: device tensors of length `max_slots` (the logit biases: rows of
    MAX_LOGIT_BIAS entries).

    Host flags of what decides the work (whether a request samples, filters, and which options it has on) let
    the runner plan a step without reading the device.
    """

    def __init__(self, max_slots: int, device: torch.device | str, vocab_size: int | None = None) -> None:
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        f32 = dict(dtype=torch.float32, device=device)
        self.temperature = torch.zeros(max_slots, **f32)
        self.top_p = torch.ones(max_slots, **f32)
        self.top_k = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self.seed = torch.zeros(max_slots, dtype=torch.int64, device=device)
        # log(min_p): a token is kept when its scaled logit is at least the row's largest plus this.
        self.log_min_p = torch.full((max_slots,), float("-inf"), **f32)
        self.presence_penalty = torch.zeros(max_slots, **f32)
        self.frequency_penalty = torch.zeros(max_slots, **f32)
        self.repetition_penalty = torch.ones(max_slots, **f32)
        self.prompt_len = torch.full((max_slots,), 2**31 - 1, dtype=torch.int32, device=device)
        # Unused entries hold (id 0, bias 0.0): adding them changes nothing, so rows need no length.
        self.bias_ids = torch.zeros(max_slots, MAX_LOGIT_BIAS, dtype=torch.int64, device=device)
        self.bias_values = torch.zeros(max_slots, MAX_LOGIT_BIAS, **f32)
        self._host_flags = np.zeros(max_slots, dtype=np.uint8)
        self._host_top_logprobs = np.full(max_slots, -1, dtype=np.int32)

    def set(self, joins: Joins, on_device=None) -> None:
        """(Re)sets the parameters of the joining slots, one indexed write per tensor.

        `on_device`, when given, holds the same arrays already on the device (as the step upload provides
        them): then no host-to-device copy happens here, and nothing waits on the device.
        """
        slots = joins.slot
        if len(slots) == 0:
            return
        dev = on_device if on_device is not None else joins.to_device(self.temperature.device)
        idx = dev.slot.long()
        self.temperature.index_copy_(0, idx, dev.temperature)
        self.top_p.index_copy_(0, idx, dev.top_p)
        self.top_k.index_copy_(0, idx, dev.top_k.long())
        self.seed.index_copy_(0, idx, dev.seed)
        old_flags = self._host_flags[slots]
        samples = np.asarray(joins.temperature) > 0
        filters = (np.asarray(joins.top_k) > 0) | (np.asarray(joins.top_p) < 1.0)
        penalties = (
            (joins.presence_penalty != 0) | (joins.frequency_penalty != 0) | (joins.repetition_penalty != 1)
        )
        flags = np.zeros(len(slots), dtype=np.uint8)
        for bit, on in (
            (_SAMPLES, samples),
            (_FILTERS, samples & filters),
            # min_p drops nothing from a greedy row's argmax.
            (_MIN_P, samples & (np.asarray(joins.min_p) > 0)),
            (_PENALTIES, penalties),
            (_BIAS, joins.bias_indptr[1:] > joins.bias_indptr[:-1]),
            (_LOGPROBS, np.asarray(joins.logprobs) >= 0),
        ):
            flags[on] |= bit
        # The optional tensors are written only when some join uses them (or a slot's previous request did):
        # steps of requests without options pay for none of it.
        if ((flags | old_flags) & _MIN_P).any():
            self.log_min_p.index_copy_(0, idx, torch.log(dev.min_p))
        if ((flags | old_flags) & _PENALTIES).any():
            self.presence_penalty.index_copy_(0, idx, dev.presence_penalty)
            self.frequency_penalty.index_copy_(0, idx, dev.frequency_penalty)
            self.repetition_penalty.index_copy_(0, idx, dev.repetition_penalty)
            self.prompt_len.index_copy_(0, idx, dev.prompt_len)
        if ((flags | old_flags) & _BIAS).any():
            self._set_bias(idx, dev, int(joins.bias_indptr[-1]))
        self._host_flags[slots] = flags
        self._host_top_logprobs[slots] = np.minimum(joins.logprobs, MAX_TOP_LOGPROBS)

    def _set_bias(self, idx: torch.Tensor, dev, num_bias: int) -> None:
        """Clears the joining slots' bias rows, then scatters the CSR entries into them."""
        self.bias_ids.index_fill_(0, idx, 0)
        self.bias_values.index_fill_(0, idx, 0.0)
        if num_bias == 0:
            return
        device = idx.device
        indptr = dev.bias_indptr.long()
        # Entry e belongs to join x with indptr[x] <= e < indptr[x + 1]; its column in the row is e -
        # indptr[x].
        join_of = torch.repeat_interleave(
            torch.arange(len(idx), device=device), indptr.diff(), output_size=num_bias
        )
        col = torch.arange(num_bias, device=device) - indptr[join_of]
        ids, values = dev.bias_ids.long(), dev.bias_values
        if self.vocab_size is not None:
            # An id outside the vocabulary would index past the logits: it adds nothing instead.
            valid = (ids >= 0) & (ids < self.vocab_size)
            ids, values = torch.where(valid, ids, 0), torch.where(valid, values, 0.0)
        # A join lists at most MAX_LOGIT_BIAS entries (the scheduler's bound); any past it would land in the
        # next slot's row, so they overwrite the row's last entry instead.
        col = col.clamp(max=MAX_LOGIT_BIAS - 1)
        rows = idx[join_of]
        self.bias_ids[rows, col] = ids
        self.bias_values[rows, col] = values

    def plan_for(self, slots: np.ndarray) -> SamplePlan:
        """The sampling work for a step of these slots, from the host copies alone."""
        flags = int(np.bitwise_or.reduce(self._host_flags[slots])) if len(slots) else 0
        if flags & _FILTERS:
            mode = SampleMode.FILTERED
        elif flags & _SAMPLES:
            mode = SampleMode.PLAIN
        else:
            mode = SampleMode.GREEDY
        return SamplePlan(
            mode=mode,
            bias=bool(flags & _BIAS),
            penalties=bool(flags & _PENALTIES),
            min_p=bool(flags & _MIN_P),
            top_logprobs=int(self._host_top_logprobs[slots].max()) if flags & _LOGPROBS else -1,
        )

    def mode_for(self, slots: np.ndarray) -> SampleMode:
        return self.plan_for(slots).mode

    def has_penalties(self, slots: np.ndarray) -> bool:
        return bool((self._host_flags[slots] & _PENALTIES).any())
