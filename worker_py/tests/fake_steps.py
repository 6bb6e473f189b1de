"""Test helper: a tiny stand-in for the scheduler that allocates KV pages and builds step objects.

The objects carry the attribute names of the real StepView (docs/protocol.md, "Step slot"), with numpy arrays
cut to their used lengths.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from minisgl.proto.step import RESULT_OK, STEP_SHUTDOWN, Logprobs, PromptLogprobs

EXTEND, DECODE = 0, 1


@dataclass
class FakeStep:
    step_id: int
    kind: int
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
    join_min_p: np.ndarray
    join_presence_penalty: np.ndarray
    join_frequency_penalty: np.ndarray
    join_repetition_penalty: np.ndarray
    join_prompt_len: np.ndarray
    join_logprobs: np.ndarray
    join_bias_indptr: np.ndarray
    join_bias_ids: np.ndarray
    join_bias_values: np.ndarray
    # Prompt logprobs: the flag, the top count, and a target per new token when the flag is set.
    prompt_logprobs: int = 0
    prompt_top: int = 0
    logprob_target: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def num_reqs(self) -> int:
        return len(self.req_slot)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Join:
    slot: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt_len: int = 2**31 - 1
    logprobs: int = -1
    bias: tuple[tuple[int, float], ...] = ()


@dataclass
class StepBuilder:
    """Hands out pages from a shuffled free list, so a request's pages are scattered and interleaved with
    other requests' pages."""

    num_pages: int
    page_size: int
    seed: int = 0
    free: list[int] = field(init=False)
    pages: dict[int, list[int]] = field(default_factory=dict, init=False)
    length: dict[int, int] = field(default_factory=dict, init=False)
    step_id: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_pages))
        random.Random(self.seed).shuffle(self.free)

    def extend(
        self,
        reqs: list[tuple[int, list[int]]],
        joins: list[Join] = (),
        targets: list[int] | None = None,
        prompt_top: int = 0,
    ) -> FakeStep:
        """reqs: (slot, new token ids) per request; ids may be negative (-(slot+1)). `targets`: one per new
        token (-1 for none), asking for prompt logprobs with `prompt_top` top entries."""
        step = self._step(EXTEND, reqs, joins)
        if targets is not None:
            assert len(targets) == step.num_tokens
            step.prompt_logprobs, step.prompt_top = 1, prompt_top
            step.logprob_target = np.asarray(targets, dtype=np.int32)
        return step

    def decode(
        self, slots: list[int], token_ids: list[int] | None = None, joins: list[Join] = ()
    ) -> FakeStep:
        """One new token per slot: the given ids, or by default each slot's own last sampled token."""
        ids = token_ids if token_ids is not None else [-(s + 1) for s in slots]
        return self._step(DECODE, [(s, [i]) for s, i in zip(slots, ids, strict=True)], joins)

    def release(self, slot: int) -> None:
        self.free.extend(self.pages.pop(slot, []))
        self.length.pop(slot, None)

    def _step(self, kind: int, reqs: list[tuple[int, list[int]]], joins: list[Join]) -> FakeStep:
        ps = self.page_size
        qo, kv, last, seq, ids, pos, loc, indices = [0], [0], [], [], [], [], [], []
        for slot, new in reqs:
            start = self.length.get(slot, 0)
            end = start + len(new)
            pages = self.pages.setdefault(slot, [])
            while len(pages) * ps < end:
                pages.append(self.free.pop())
            self.length[slot] = end
            ids += new
            pos += range(start, end)
            loc += [pages[p // ps] * ps + p % ps for p in range(start, end)]
            indices += pages
            qo.append(len(ids))
            kv.append(len(indices))
            seq.append(end)
            last.append(end - (len(pages) - 1) * ps)
        self.step_id += 1

        def i32(xs) -> np.ndarray:
            return np.asarray(xs, dtype=np.int32)

        def f32(xs) -> np.ndarray:
            return np.asarray(xs, dtype=np.float32)

        return FakeStep(
            step_id=self.step_id - 1,
            kind=kind,
            req_slot=i32([s for s, _ in reqs]),
            seq_len=i32(seq),
            qo_indptr=i32(qo),
            kv_indptr=i32(kv),
            kv_last_page_len=i32(last),
            input_ids=i32(ids),
            positions=i32(pos),
            out_loc=i32(loc),
            kv_indices=i32(indices),
            join_slot=i32([j.slot for j in joins]),
            join_temperature=f32([j.temperature for j in joins]),
            join_top_p=f32([j.top_p for j in joins]),
            join_top_k=i32([j.top_k for j in joins]),
            join_seed=np.asarray([j.seed for j in joins], dtype=np.uint64),
            join_min_p=f32([j.min_p for j in joins]),
            join_presence_penalty=f32([j.presence_penalty for j in joins]),
            join_frequency_penalty=f32([j.frequency_penalty for j in joins]),
            join_repetition_penalty=f32([j.repetition_penalty for j in joins]),
            join_prompt_len=i32([j.prompt_len for j in joins]),
            join_logprobs=i32([j.logprobs for j in joins]),
            join_bias_indptr=i32(np.cumsum([0, *(len(j.bias) for j in joins)])),
            join_bias_ids=i32([t for j in joins for t, _ in j.bias]),
            join_bias_values=f32([v for j in joins for _, v in j.bias]),
        )


class ReadySteps:
    """Both rings of a scheduler that published every step (then a shutdown) before the worker started: the
    most overlap there can be. Records each result, in order, and when it came."""

    def __init__(self, steps: list) -> None:
        shutdown = type("Shutdown", (), {"kind": STEP_SHUTDOWN, "step_id": len(steps)})()
        self.steps, self.i = [*steps, shutdown], 0
        self.results: list[tuple[int, list[int]]] = []
        self.logprobs: list = []  # what each result carried beside its tokens (None, or a Logprobs)
        self.prompt: list = []  # and the prompt logprobs (None, or a PromptLogprobs)
        self.times: list[float] = []

    def try_next(self):
        return self.steps[self.i] if self.i < len(self.steps) else None

    def wait(self, timeout=None):
        return self.try_next()

    def release(self) -> None:
        self.i += 1

    def write(self, step_id, tokens, status=RESULT_OK, timeout=None, logprobs=None, prompt=None) -> bool:
        assert status == RESULT_OK
        self.times.append(time.perf_counter())
        self.results.append((step_id, np.asarray(tokens).tolist()))
        # Copies: the runner's buffers are reused IN_FLIGHT steps later.
        self.logprobs.append(
            None if logprobs is None else Logprobs(*(np.array(a) for a in vars(logprobs).values()))
        )
        self.prompt.append(
            None if prompt is None else PromptLogprobs(*(np.array(a) for a in vars(prompt).values()))
        )
        return True
