"""Step and result slots as numpy views: layout rule, lengths, zero copy, and per-step cost."""

from __future__ import annotations

import time

import numpy as np
import pytest

from minisgl.proto.step import (
    STEP_EXTEND,
    Capacity,
    Logprobs,
    PromptLogprobs,
    ResultLayout,
    ResultSlot,
    StepLayout,
    StepSlot,
    StepView,
    read_result,
    write_result,
)


@pytest.mark.parametrize("cap", [Capacity(1, 1, 1), Capacity(3, 5, 7), Capacity(256, 8192, 65536)])
def test_arrays_are_aligned_in_order_and_tight(cap):
    layout = StepLayout(cap)
    end = 64
    for a in layout.arrays:
        assert a.offset % 64 == 0
        assert end <= a.offset < end + 64
        end = a.offset + a.nbytes
    assert layout.slot_bytes == -(-end // 64) * 64
    lengths = {a.name: a.length for a in layout.arrays}
    assert lengths["qo_indptr"] == lengths["kv_indptr"] == cap.max_reqs + 1
    assert lengths["input_ids"] == cap.max_tokens and lengths["kv_indices"] == cap.max_kv_indices


def fill(slot: StepSlot, n: int, t: int, k: int, j: int, b: int = 0, g: int = 0) -> None:
    slot.write_header(2**40 + 3, STEP_EXTEND, n, t, k, j, b, g)
    for a in slot.layout.arrays:
        arr = getattr(slot, a.name)
        arr[:] = np.arange(1, len(arr) + 1, dtype=arr.dtype)


def test_views_are_cut_to_the_header_counts_and_share_memory():
    layout = StepLayout(Capacity(4, 8, 6, mask_words=3))
    buf = np.zeros(layout.slot_bytes, np.uint8)
    slot = StepSlot(layout, buf)
    fill(slot, n=2, t=5, k=0, j=4, b=301, g=2)
    v = StepView(layout, buf)
    assert (v.step_id, v.kind, v.num_reqs, v.num_tokens, v.num_kv_indices, v.num_joins, v.num_bias) == (
        2**40 + 3,
        0,
        2,
        5,
        0,
        4,
        301,
    )
    assert v.num_masks == 2
    expected = {"n": 2, "n+1": 3, "t": 5, "k": 0, "j": 4, "j+1": 5, "b": 301, "g*W": 6, "u": 0}
    for a in layout.arrays:
        arr = getattr(v, a.name)
        assert len(arr) == expected[a.used_by], a.name
        assert arr.dtype == a.dtype
        assert arr.tolist() == list(range(1, len(arr) + 1))
    v.input_ids[0] = -7  # a view, not a copy
    assert slot.input_ids[0] == -7
    assert np.shares_memory(v.join_seed, buf)
    assert slot.view().input_ids[0] == -7


def test_a_buffer_too_small_is_refused():
    layout = StepLayout(Capacity(4, 8, 6))
    with pytest.raises(ValueError, match="layout needs 11136"):
        StepView(layout, bytearray(900))
    with pytest.raises(ValueError):
        ResultSlot(ResultLayout(Capacity(4, 8, 6)), bytearray(64))


def test_results_round_trip():
    layout = ResultLayout(Capacity(4, 8, 6))
    buf = bytearray(layout.slot_bytes)
    write_result(layout, buf, 9, np.array([151645, 0, 7], np.int32))
    step_id, status, tokens = read_result(layout, buf)
    assert (step_id, status, tokens.tolist()) == (9, 0, [151645, 0, 7])
    write_result(layout, buf, 10, None, status=1)
    assert read_result(layout, buf)[:2] == (10, 1)
    with pytest.raises(ValueError, match="holds 4"):
        write_result(layout, buf, 11, np.zeros(5, np.int32))


def test_logprobs_round_trip_packed_by_row():
    layout = ResultLayout(Capacity(4, 8, 6))
    slot = ResultSlot(layout, bytearray(layout.slot_bytes))
    lp = Logprobs(
        np.array([-0.5, -1.5, -0.25], np.float32),
        np.array([[7, 1], [2, 9], [4, 4]], np.int32),
        np.array([[-0.5, -2.0], [-1.0, -1.5], [-0.25, -0.25]], np.float32),
    )
    slot.write(3, np.array([7, 9, 4], np.int32), logprobs=lp)
    got = slot.read_logprobs()
    assert got.logprob.tolist() == [-0.5, -1.5, -0.25]
    assert got.top_ids.tolist() == [[7, 1], [2, 9], [4, 4]]
    assert got.top_logprobs.tolist() == lp.top_logprobs.tolist()
    assert slot.top_ids[:6].tolist() == [7, 1, 2, 9, 4, 4]  # rows one after another, m entries each
    # Only the sampled token's logprob: m = 0.
    slot.write(
        4, np.array([1], np.int32), logprobs=Logprobs(np.array([-3.0], np.float32), *[np.zeros((1, 0))] * 2)
    )
    got = slot.read_logprobs()
    assert got.logprob.tolist() == [-3.0] and got.top_ids.shape == (1, 0)
    # A later step without logprobs says so: stale values are not read back.
    slot.write(5, np.array([1, 2], np.int32))
    assert slot.read_logprobs() is None
    with pytest.raises(ValueError, match="expected 2 rows"):
        slot.write(6, np.array([1, 2], np.int32), logprobs=lp)


def test_targets_are_cut_to_t_only_when_the_step_asks_for_prompt_logprobs():
    layout = StepLayout(Capacity(4, 8, 6))
    slot = StepSlot(layout, np.zeros(layout.slot_bytes, np.uint8))
    slot.logprob_target[:5] = [3, -1, 4, 1, -1]
    slot.write_header(1, STEP_EXTEND, 2, 5, 0, 0)
    assert len(slot.view().logprob_target) == 0
    slot.write_header(1, STEP_EXTEND, 2, 5, 0, 0, prompt_logprobs=1, prompt_top=7)
    v = slot.view()
    assert v.logprob_target.tolist() == [3, -1, 4, 1, -1] and (v.prompt_logprobs, v.prompt_top) == (1, 7)


def test_prompt_logprobs_round_trip_packed_by_entry():
    layout = ResultLayout(Capacity(4, 8, 6))
    slot = ResultSlot(layout, bytearray(layout.slot_bytes))
    prompt = PromptLogprobs(
        np.array([-0.5, -7.0], np.float32),
        np.array([[7, 1, 2], [2, 9, 3]], np.int32),
        np.array([[-0.5, -2.0, -3.0], [-1.0, -1.5, -2.5]], np.float32),
    )
    slot.write(3, np.array([7], np.int32), prompt=prompt)
    assert slot.read_logprobs() is None, "the sampled tokens' logprobs were not asked for"
    got = slot.read_prompt_logprobs()
    assert got.logprob.tolist() == [-0.5, -7.0]
    assert got.top_ids.tolist() == [[7, 1, 2], [2, 9, 3]]
    assert slot.prompt_top_ids[:6].tolist() == [7, 1, 2, 2, 9, 3]
    slot.write(4, np.array([7], np.int32))
    assert slot.read_prompt_logprobs() is None
    too_many = PromptLogprobs(
        np.zeros(9, np.float32), np.zeros((9, 0), np.int32), np.zeros((9, 0), np.float32)
    )
    with pytest.raises(ValueError, match="9 prompt logprobs"):
        slot.write(5, np.array([7], np.int32), prompt=too_many)


def test_a_view_per_step_costs_microseconds():
    layout = StepLayout(Capacity(256, 8192, 65536))
    slot = StepSlot(layout, np.zeros(layout.slot_bytes, np.uint8))
    fill(slot, 256, 8192, 65536, 256, 256 * 300)
    rounds = 2000
    t = time.perf_counter()
    for _ in range(rounds):
        slot.view()
    per_view = (time.perf_counter() - t) / rounds
    # About 2 us on a quiet core; the bound only catches per-request work or copies sneaking in.
    assert per_view < 100e-6, f"{per_view * 1e6:.1f} us per view"
