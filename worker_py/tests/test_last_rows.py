"""LastRows: each request's last new token picked out with fixed shapes only (what a captured graph runs),
from a step of token rows and from a padded extend step."""

from __future__ import annotations

import numpy as np
import torch
from fake_steps import StepBuilder

from minisgl.worker.last_rows import LastRows
from minisgl.worker.padding import DecodePadding, ExtendPadding, padded_arrays
from minisgl.worker.token_rows import token_rows

PAGE_SIZE, MAX_REQS, SCRATCH = 4, 6, 6


def arrays(step, padding):
    names = ("req_slot", "seq_len", "qo_indptr")
    return {n: torch.from_numpy(a) for n, a in zip(names, padded_arrays(step, names, padding), strict=True)}


def two_steps():
    b = StepBuilder(64, PAGE_SIZE, seed=1)
    b.extend([(2, [1, 2, 3, 4, 5])])
    # A cached prefix continued, a fresh prompt, a decode row between them.
    yield b.extend([(2, [6, 7, 8]), (0, [9]), (5, [10, 11, 12, 13])])
    yield b.extend([(3, [1, 2]), (4, [3, 4, 5])])


def test_token_rows_gather_each_requests_last_row_in_request_order():
    last = LastRows(MAX_REQS, 3, torch.float32, torch.device("cpu"), SCRATCH)
    for step in two_steps():
        rows = token_rows(step, PAGE_SIZE, SCRATCH)
        t, n = len(step.input_ids), len(step.req_slot)
        a = arrays(rows.step, DecodePadding(16, 63, SCRATCH, PAGE_SIZE))  # padded past the rows
        hidden = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
        last.gather_token_rows(hidden, a["req_slot"], a["seq_len"])
        want = torch.from_numpy(step.qo_indptr[1:] - 1).long()
        assert torch.equal(last.hidden[:n], hidden[want])
        assert last.slot[:n].tolist() == step.req_slot.tolist()
        assert last.seq_len[:n].tolist() == step.seq_len.tolist()
        # Every later row (the first step's fourth too, on the second) holds the scratch slot.
        assert last.slot[n:].tolist() == [SCRATCH] * (MAX_REQS + 1 - n) and t > n


def test_extend_steps_gather_each_requests_last_token():
    last = LastRows(MAX_REQS, 3, torch.float32, torch.device("cpu"), SCRATCH)
    for step in two_steps():
        n = len(step.req_slot)
        a = arrays(step, ExtendPadding(32, MAX_REQS, 63, SCRATCH, PAGE_SIZE))
        hidden = torch.randn(32, 3)
        last.gather_requests(hidden, a["qo_indptr"], a["req_slot"], a["seq_len"])
        want = torch.from_numpy(step.qo_indptr[1:] - 1).long()
        assert torch.equal(last.hidden[:n], hidden[want])
        assert last.slot[:n].tolist() == step.req_slot.tolist()
        assert last.seq_len[:n].tolist() == step.seq_len.tolist()
        assert last.slot[n:].tolist() == [SCRATCH] * (MAX_REQS + 1 - n)


def test_an_empty_capture_step_gathers_nothing_real():
    """A graph is captured from an empty step: every padding request's row index must stay in range."""
    last = LastRows(MAX_REQS, 3, torch.float32, torch.device("cpu"), SCRATCH)
    empty = next(two_steps())
    per_token = ("input_ids", "positions", "out_loc", "kv_indices")
    for name in (*per_token, "req_slot", "seq_len", "kv_last_page_len"):
        setattr(empty, name, np.zeros(0, dtype=np.int32))
    empty.qo_indptr = empty.kv_indptr = np.zeros(1, dtype=np.int32)
    a = arrays(empty, ExtendPadding(8, MAX_REQS, 63, SCRATCH, PAGE_SIZE))
    last.gather_requests(torch.randn(8, 3), a["qo_indptr"], a["req_slot"], a["seq_len"])
    assert last.slot.tolist() == [SCRATCH] * (MAX_REQS + 1)
