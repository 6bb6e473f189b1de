"""Padding a step up to the size of a captured CUDA graph, and choosing that size.

Pure numpy and bisect: no device, so CI tests it on the CPU.

A decode step is padded with rows (`DecodePadding`). A padding row is a request of one token that touches
nothing real: its K/V goes to offset 0 of a scratch page that no request is ever given, it attends to that
one position, its input id is 0 (never a `-(slot + 1)` reference, so it reads no slot's last token), and its
request slot is a scratch slot past the last real one, whose last token and sampling parameters nobody reads.

An extend step is padded to a token count and a request count apart (`ExtendPadding`): padding tokens follow
the last request's, belong to no request (the attention writes nothing for them; their K/V go to the scratch
page, their ids are 0), and padding requests have no tokens and no pages, in the scratch slot. One page
index follows the step's, the scratch page's, listed by no request: a graph is captured from an empty step,
and torch gives an empty slice of the device buffer a null data pointer, which the graph would keep.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import numpy as np

from minisgl.proto.step import STEP_ARRAYS


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes to capture: dense where padding would cost the most relative to the batch
    (1, 2, 4, then steps of 8 up to 64), steps of 16 beyond, and `max_batch` itself."""
    if max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = {1, 2, 4, max_batch}
    sizes.update(range(8, min(max_batch, 64) + 1, 8))
    sizes.update(range(80, max_batch + 1, 16))
    return sorted(s for s in sizes if s <= max_batch)


# Token counts of the small extend steps captured as one row per token (token_rows.py): past 512 an extend
# step's kernels take longer than its host time, and the rows' attention rereads each request's keys.
TOKEN_GRAPH_SIZES = (8, 16, 32, 64, 128, 256, 512)


def token_graph_sizes(limit: int, max_step_tokens: int) -> list[int]:
    """The extend-step token counts to capture: those of TOKEN_GRAPH_SIZES up to `limit` (0: none) that a
    step may reach."""
    return [s for s in TOKEN_GRAPH_SIZES if s <= min(limit, max_step_tokens)]


# Token counts of the extend steps captured as what they are (`ExtendPadding`), for the steps the token-row
# graphs do not take: more than their 512 tokens, or rows that would reread a long cached prefix.
EXTEND_GRAPH_SIZES = (512, 1024, 2048, 4096, 8192, 16384)


def extend_graph_sizes(limit: int, max_step_tokens: int) -> list[int]:
    """The extend-step token counts to capture: those of EXTEND_GRAPH_SIZES up to `limit` (0: none) that a
    step may reach."""
    return [s for s in EXTEND_GRAPH_SIZES if s <= min(limit, max_step_tokens)]


def bucket_for(num_reqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `num_reqs` rows; None when none does (or for an empty batch)."""
    if num_reqs <= 0:
        return None
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None


# What each packed array is counted in (docs/protocol.md's bases), and which count its padding grows:
# tokens, requests, or page indices.
_PROTOCOL_BASIS = {name: basis for name, _, basis in STEP_ARRAYS if basis in ("t", "n", "n+1", "k")}
_BASIS = {name: basis.removesuffix("+1") for name, basis in _PROTOCOL_BASIS.items()}


@dataclass(frozen=True)
class DecodePadding:
    rows: int  # the padded batch size
    scratch_page: int
    scratch_slot: int
    page_size: int

    def grow(self, n: int, t: int) -> dict[str, int]:
        """Entries each basis gains: a row is a token, a request and a page."""
        if n != t:
            raise ValueError(f"only decode steps are padded by rows (one token per request): {n} and {t}")
        if self.rows < n:
            raise ValueError(f"a batch of {n} does not fit {self.rows} rows")
        pad = self.rows - n
        return {"t": pad, "n": pad, "k": pad}

    def tails(self, pad: int, t: int, k: int) -> dict[str, int | np.ndarray]:
        """What each array's padding rows hold (see the module docstring): a value for all of them, or the
        indptrs' continuation past the step's `t` tokens and `k` page indices, one more for each row."""
        steps = _one_to(pad)
        return {
            "input_ids": 0,
            "positions": 0,
            "out_loc": self.scratch_page * self.page_size,
            "req_slot": self.scratch_slot,
            "seq_len": 1,
            "qo_indptr": t + steps,
            "kv_indptr": k + steps,
            "kv_last_page_len": 1,
            "kv_indices": self.scratch_page,
        }


@dataclass(frozen=True)
class ExtendPadding:
    tokens: int  # the padded token count
    reqs: int  # the padded request count
    scratch_page: int
    scratch_slot: int
    page_size: int

    def grow(self, n: int, t: int) -> dict[str, int]:
        """Entries each basis gains: padding tokens, padding requests of no page, and the one scratch page."""
        if t > self.tokens or n > self.reqs:
            raise ValueError(
                f"a step of {n} requests and {t} tokens does not fit {self.reqs} and {self.tokens}"
            )
        return {"t": self.tokens - t, "n": self.reqs - n, "k": 1}

    def tails(self, pad: int, t: int, k: int) -> dict[str, int | np.ndarray]:
        """What the padding entries hold (see the module docstring); `pad` is unused: every value is one for
        all of an array's padding entries."""
        return {
            "input_ids": 0,
            "positions": 0,
            "out_loc": self.scratch_page * self.page_size,
            "req_slot": self.scratch_slot,
            "seq_len": 0,
            "qo_indptr": t,
            "kv_indptr": k,
            "kv_last_page_len": 0,
            "kv_indices": self.scratch_page,
        }


Padding = DecodePadding | ExtendPadding


def padded_sizes(step, names: tuple[str, ...], padding: Padding | None) -> list[int]:
    """The sizes of the step's arrays `names` (protocol names) once `pack` has padded them: from the three
    counts every one of them is cut by (docs/protocol.md), not from each array."""
    n, t, k = len(step.req_slot), len(step.input_ids), len(step.kv_indices)
    if padding is not None:
        grow = padding.grow(n, t)
        n, t, k = n + grow["n"], t + grow["t"], k + grow["k"]
    count = {"t": t, "n": n, "n+1": n + 1, "k": k}
    return [count[_PROTOCOL_BASIS[name]] for name in names]


def pack(step, names: tuple[str, ...], padding: Padding | None, out: np.ndarray) -> None:
    """Writes the step's arrays `names` one after another into `out` (int32), each followed by its padding
    entries, at the sizes `padded_sizes` gives. No temporary arrays: this runs on every step's host path."""
    grow = tails = None
    if padding is not None:
        n, t, k = len(step.req_slot), len(step.input_ids), len(step.kv_indices)
        grow = padding.grow(n, t)
        # A batch the size of its graph has no padding rows: nothing to work out.
        tails = padding.tails(grow["n"], t, k) if any(grow.values()) else None
    offset = 0
    for name in names:
        a = getattr(step, name)
        out[offset : offset + len(a)] = a
        offset += len(a)
        if tails is not None and (pad := grow[_BASIS[name]]):
            out[offset : offset + pad] = tails[name]
            offset += pad


def padded_arrays(step, names: tuple[str, ...], padding: Padding | None) -> list[np.ndarray]:
    """The step's arrays `names` (protocol names) with their padding entries: `pack` into int32 arrays of
    their own."""
    sizes = padded_sizes(step, names, padding)
    flat = np.empty(sum(sizes), dtype=np.int32)
    pack(step, names, padding, flat)
    return np.split(flat, np.cumsum(sizes)[:-1])


@functools.cache
def _one_to(pad: int) -> np.ndarray:
    steps = np.arange(1, pad + 1, dtype=np.int32)
    steps.flags.writeable = False  # shared by every step padded by `pad` rows
    return steps
