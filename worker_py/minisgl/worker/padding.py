"""Padding a decode step up to the batch size of a captured CUDA graph, and choosing that size.

Pure numpy and bisect: no device, so CI tests it on the CPU.

A padding row is a request of one token that touches nothing real: its K/V goes to offset 0 of a scratch page
that no request is ever given, it attends to that one position, its input id is 0 (never a `-(slot + 1)`
reference, so it reads no slot's last token), and its request slot is a scratch slot past the last real one,
whose last token and sampling parameters nobody reads.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes to capture: dense where padding would cost the most relative to the batch
    (1, 2, 4, then steps of 8 up to 64), steps of 16 beyond, and `max_batch` itself."""
    if max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = {1, 2, 4, max_batch}
    sizes.update(range(8, min(max_batch, 64) + 1, 8))
    sizes.update(range(80, max_batch + 1, 16))
    return sorted(s for s in sizes if s <= max_batch)


def bucket_for(num_reqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `num_reqs` rows; None when none does (or for an empty batch)."""
    if num_reqs <= 0:
        return None
    i = bisect.bisect_left(sizes, num_reqs)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class DecodePadding:
    rows: int  # the padded batch size
    scratch_page: int
    scratch_slot: int
    page_size: int


def padded_arrays(step, names: tuple[str, ...], padding: DecodePadding | None) -> list[np.ndarray]:
    """The step's arrays `names` (protocol names), each extended by `padding.rows - n` padding rows."""
    arrays = {name: np.asarray(getattr(step, name)) for name in names}
    if padding is None:
        return [arrays[name] for name in names]
    n, t, k = len(arrays["req_slot"]), len(arrays["input_ids"]), len(arrays["kv_indices"])
    if n != t:
        raise ValueError(f"only decode steps are padded (one token per request): {n} requests, {t} tokens")
    pad = padding.rows - n
    if pad < 0:
        raise ValueError(f"a batch of {n} does not fit {padding.rows} rows")
    ones = np.ones(pad, dtype=np.int32)
    steps = np.arange(1, pad + 1, dtype=np.int32)
    tail = {
        "input_ids": np.zeros(pad, dtype=np.int32),
        "positions": np.zeros(pad, dtype=np.int32),
        "out_loc": np.full(pad, padding.scratch_page * padding.page_size, dtype=np.int32),
        "req_slot": np.full(pad, padding.scratch_slot, dtype=np.int32),
        "seq_len": ones,
        "qo_indptr": t + steps,
        "kv_indptr": k + steps,
        "kv_last_page_len": ones,
        "kv_indices": np.full(pad, padding.scratch_page, dtype=np.int32),
    }
    return [np.concatenate((arrays[name], tail[name])) for name in names]
