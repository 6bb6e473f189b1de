"""A small extend step recast as a decode step of one row per new token, so that a captured graph runs it.

An eager extend step costs 10 to 13 ms of host time on a GPU whatever its size (a hundred Triton and cuBLAS
launches from Python, FlashInfer's plan and runs), which is all of a short prompt's prefill. Decode graphs
need one token per row; attention only needs each new token to see its request's positions up to its own.
Both hold if every new token is its own row: row i attends to the first `positions[i] + 1` positions of its
request (its K/V, and those of the tokens before it in the step, are written before any layer attends), so
its page list is the first pages of its request's. The last new token of each request keeps the request's
slot; the others take the scratch slot, whose last token and sampling state nobody reads. That is also how
the graph tells the last rows apart, to gather them for the sampling (`last_rows.py`).

Pure numpy, vectorized (no loop over requests): CI checks it on the CPU against the eager forward.
"""

from __future__ import annotations

import functools

import numpy as np

# The most key positions a step's rows may read in all, each row reading its request's keys up to its own
# position once: a 512-token prompt reads 131,328. A chunk that continues a long cached prefix would read the
# prefix once per row (256 rows after 16,000 cached tokens: 4.1 million a layer), far more than the eager
# prefill kernel reads; such a step runs eagerly.
MAX_ROW_POSITIONS = 1 << 18


def worth_rows(step, max_tokens: int) -> bool:
    """Whether the step should run as token rows: at most `max_tokens` new tokens (the largest graph), whose
    rows read at most MAX_ROW_POSITIONS key positions in all (the new tokens' positions, plus one each)."""
    positions = np.asarray(step.positions)
    if len(positions) > max_tokens:
        return False
    return int(positions.sum(dtype=np.int64)) + len(positions) <= MAX_ROW_POSITIONS


class TokenRowsStep:
    """The step as a decode step of `t` rows: the per-request and per-token arrays replaced, everything else
    (the step id, the joins, the masks) read from the original step."""

    def __init__(self, step, arrays: dict[str, np.ndarray]) -> None:
        self._step = step
        self.__dict__.update(arrays)

    def __getattr__(self, name: str):
        return getattr(self._step, name)


class TokenRows:
    """The step as rows (`step`), and each row's real request slot (`token_slot`, int32 [t]: the penalties
    count tokens by it), worked out when first read: after the replay."""

    def __init__(self, step: TokenRowsStep, req_slot: np.ndarray, qo_len: np.ndarray) -> None:
        self.step = step
        self._req_slot, self._qo_len = req_slot, qo_len

    @functools.cached_property
    def token_slot(self) -> np.ndarray:
        return np.repeat(self._req_slot, self._qo_len)


def token_rows(step, page_size: int, scratch_slot: int) -> TokenRows:
    """`step` (an extend step, or any step) as one row per new token. int32 throughout and no np.diff: this
    runs before a small prefill's replay, where every microsecond delays its first token (issue 12)."""
    qo_indptr = np.asarray(step.qo_indptr, dtype=np.int32)
    kv_indptr = np.asarray(step.kv_indptr, dtype=np.int32)
    req_slot = np.asarray(step.req_slot, dtype=np.int32)
    positions = np.asarray(step.positions, dtype=np.int32)
    t = len(positions)
    qo_len = qo_indptr[1:] - qo_indptr[:-1]
    # A row sees positions 0..p: ceil((p + 1) / page_size) pages, the last holding p % page_size + 1.
    pages, last_page_len = np.divmod(positions, page_size)
    pages += 1
    last_page_len += 1
    row_kv_indptr = np.empty(t + 1, dtype=np.int32)
    row_kv_indptr[0] = 0
    np.add.accumulate(pages, dtype=np.int32, out=row_kv_indptr[1:])
    # Page j of row i is page j of its request: kv_indices[kv_indptr[req] + j].
    first = np.repeat(np.repeat(kv_indptr[:-1], qo_len) - row_kv_indptr[:-1], pages)
    kv_indices = np.asarray(step.kv_indices, dtype=np.int32)[
        first + np.arange(row_kv_indptr[-1], dtype=np.int32)
    ]
    slots = np.full(t, scratch_slot, dtype=np.int32)
    slots[qo_indptr[1:] - 1] = req_slot  # each request's last row
    arrays = {
        # The token arrays are the step's; set here too, so that reading them is no call to __getattr__.
        "input_ids": step.input_ids,
        "positions": step.positions,
        "out_loc": step.out_loc,
        "req_slot": slots,
        "seq_len": positions + 1,
        "qo_indptr": np.arange(t + 1, dtype=np.int32),
        "kv_indptr": row_kv_indptr,
        "kv_last_page_len": last_page_len,
        "kv_indices": kv_indices,
    }
    return TokenRows(TokenRowsStep(step, arrays), req_slot, qo_len)
