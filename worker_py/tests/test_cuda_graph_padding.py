"""Graph batch sizes, bucket choice, padding of decode steps, and where the padded arrays land (CPU only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_steps import Join, StepBuilder

from minisgl.sampling.params import SampleMode
from minisgl.worker.batch import _PACKED as NAMES
from minisgl.worker.batch import BatchUploader
from minisgl.worker.cuda_graph import DecodeGraphs, _empty_decode_step
from minisgl.worker.padding import (
    DecodePadding,
    ExtendPadding,
    bucket_for,
    graph_batch_sizes,
    padded_arrays,
)


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    sizes = graph_batch_sizes(256)
    assert sizes[:11] == graph_batch_sizes(64)
    assert sizes[11:] == list(range(80, 257, 16))
    assert graph_batch_sizes(100)[-3:] == [80, 96, 100]
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_bucket_is_the_smallest_size_that_fits():
    sizes = graph_batch_sizes(256)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65, 81, 256)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        64,
        80,
        96,
        256,
    ]
    assert bucket_for(257, sizes) is None
    assert bucket_for(0, sizes) is None


def decode_step(slots=(4, 0, 2), seed=0):
    b = StepBuilder(num_pages=40, page_size=4, seed=seed)
    b.extend([(s, list(range(5 + s))) for s in slots])
    return b.decode(list(slots))


def test_padding_rows_touch_only_the_scratch_page_and_slot():
    step = decode_step()
    pad = DecodePadding(rows=8, scratch_page=40, scratch_slot=9, page_size=4)
    got = dict(zip(NAMES, padded_arrays(step, NAMES, pad), strict=True))
    n, k = 3, len(step.kv_indices)
    for name in NAMES:
        real = np.asarray(getattr(step, name))
        np.testing.assert_array_equal(got[name][: len(real)], real)  # real rows are untouched
    assert all(len(got[name]) == 8 for name in ("input_ids", "positions", "out_loc", "req_slot", "seq_len"))
    np.testing.assert_array_equal(got["input_ids"][n:], 0)  # never a -(slot+1) reference
    np.testing.assert_array_equal(got["positions"][n:], 0)
    np.testing.assert_array_equal(got["out_loc"][n:], 40 * 4)
    np.testing.assert_array_equal(got["req_slot"][n:], 9)
    np.testing.assert_array_equal(got["seq_len"][n:], 1)
    np.testing.assert_array_equal(got["kv_last_page_len"][n:], 1)
    np.testing.assert_array_equal(got["qo_indptr"], np.arange(9))
    np.testing.assert_array_equal(got["kv_indptr"][n + 1 :], k + np.arange(1, 6))
    np.testing.assert_array_equal(got["kv_indices"][k:], 40)
    for name in NAMES:
        assert got[name].dtype == np.int32


def test_no_padding_and_refusals():
    step = decode_step()
    plain = padded_arrays(step, NAMES, None)
    for name, a in zip(NAMES, plain, strict=True):
        np.testing.assert_array_equal(a, getattr(step, name))
    with pytest.raises(ValueError, match="does not fit"):
        padded_arrays(step, NAMES, DecodePadding(2, 40, 9, 4))
    b = StepBuilder(num_pages=40, page_size=4)
    with pytest.raises(ValueError, match="only decode steps"):
        padded_arrays(b.extend([(0, [1, 2, 3])]), NAMES, DecodePadding(4, 40, 9, 4))


def extend_step():
    """Two prompts, the second after a cached prefix of one page, and a one-token decode between them."""
    b = StepBuilder(num_pages=40, page_size=4, seed=1)
    b.extend([(1, [7, 8])])
    return b.extend([(0, list(range(10, 16))), (1, [-2]), (2, list(range(20, 29)))])


def test_extend_padding_adds_tokens_of_no_request_and_requests_of_no_token():
    step = extend_step()
    n, t, k = 3, 16, len(step.kv_indices)
    pad = ExtendPadding(tokens=24, reqs=5, scratch_page=40, scratch_slot=9, page_size=4)
    got = dict(zip(NAMES, padded_arrays(step, NAMES, pad), strict=True))
    for name in NAMES:
        real = np.asarray(getattr(step, name))
        np.testing.assert_array_equal(got[name][: len(real)], real)  # real entries are untouched
        assert got[name].dtype == np.int32
    assert [len(got[name]) for name in NAMES] == [24, 24, 24, 5, 5, 6, 6, 5, k + 1]
    np.testing.assert_array_equal(got["input_ids"][t:], 0)
    np.testing.assert_array_equal(got["positions"][t:], 0)
    np.testing.assert_array_equal(got["out_loc"][t:], 40 * 4)  # the scratch page's K/V
    np.testing.assert_array_equal(got["req_slot"][n:], 9)
    np.testing.assert_array_equal(got["seq_len"][n:], 0)
    np.testing.assert_array_equal(got["qo_indptr"][n:], t)  # no tokens: the padding tokens are nobody's
    np.testing.assert_array_equal(got["kv_indptr"][n:], k)  # no pages
    assert got["kv_indices"][k] == 40  # the scratch page, listed by no request
    with pytest.raises(ValueError, match="does not fit"):
        padded_arrays(step, NAMES, ExtendPadding(15, 5, 40, 9, 4))
    with pytest.raises(ValueError, match="does not fit"):
        padded_arrays(step, NAMES, ExtendPadding(24, 2, 40, 9, 4))


def test_uploaded_extend_batch_puts_every_table_at_fixed_offsets():
    """An extend graph captured at T tokens and R requests reads every array but the page indices' tail
    from where it found them at capture, whatever the step's own counts."""
    up = BatchUploader(capacity=512, device=torch.device("cpu"))
    pad = ExtendPadding(tokens=32, reqs=8, scratch_page=40, scratch_slot=9, page_size=4)
    # The empty step is the one a graph is captured from: an empty page-index slice would have a null data
    # pointer (torch's), and the captured attention would keep reading through it.
    for step in (extend_step(), decode_step(), _empty_decode_step()):
        batch = up.upload(step, pad)
        assert (batch.num_reqs, batch.num_tokens) == (8, 32)
        base = batch.input_ids.data_ptr()
        offsets = [(getattr(batch, name).data_ptr() - base) // 4 for name in NAMES]
        assert offsets == [0, 32, 64, 96, 104, 112, 121, 130, 138]
        np.testing.assert_array_equal(batch.kv_indices.numpy(), [*step.kv_indices, 40])


def graphs_with(sizes, max_kv_indices) -> DecodeGraphs:
    return DecodeGraphs(
        forward=None,
        attn=None,
        uploader=None,
        sizes=sizes,
        scratch_page=40,
        scratch_slot=9,
        page_size=4,
        max_kv_indices=max_kv_indices,
    )


class _PlansOnly:
    """An attention backend that records which graph plan each replay asked for."""

    short_graphs = True

    def __init__(self) -> None:
        self.plans = []

    def plan_graph(self, batch, rows, token_rows=False, short=False) -> None:
        self.plans.append((rows, short))


class _Replayed:
    def __init__(self, log: list, key) -> None:
        self.log, self.key = log, key

    def replay(self) -> None:
        self.log.append(self.key)


def test_short_context_twins_replay_for_steps_whose_contexts_are_all_short():
    attn, log = _PlansOnly(), []
    graphs = DecodeGraphs(
        forward=None,
        attn=attn,
        uploader=None,
        sizes=[1, 2, 4, 8, 16, 24],
        scratch_page=40,
        scratch_slot=9,
        page_size=4,
        max_kv_indices=64,
        short_context=12,
    )
    assert graphs.short_sizes == [1, 2, 4, 8, 16]  # the twins stop at SHORT_MAX_ROWS
    for rows in graphs.sizes:
        for short in (False, True) if rows in graphs.short_sizes else (False,):
            graphs._graphs[rows, short] = _Replayed(log, (rows, short))
            graphs._logits[rows, short] = f"logits {rows} {short}"
            graphs._sample_graphs[rows, short, SampleMode.GREEDY] = _Replayed(log, ("sampling", rows, short))
            graphs._sampled[rows, short, SampleMode.GREEDY] = f"sampled {rows} {short}"
    up = BatchUploader(capacity=512, device=torch.device("cpu"))
    b = StepBuilder(num_pages=40, page_size=4, seed=3)
    b.extend([(0, list(range(11))), (1, list(range(5))), (2, list(range(20)))])
    for slots, rows, short in (([0, 1], 2, True), ([0, 1, 2], 4, False), ([0], 1, False)):
        step = b.decode(slots)  # slot 0 holds 12 tokens, then 13, then 14: past the twins' 12 after the first
        batch = up.upload(step, graphs.padding_for(step))
        assert graphs.replay(batch, rows) == f"logits {rows} {short}"
        assert graphs.replay_sampling(rows, SampleMode.GREEDY) == f"sampled {rows} {short}"
        assert attn.plans[-1] == (rows, short) and log[-2:] == [(rows, short), ("sampling", rows, short)]
    # Without a backend whose plan depends on the context, or with 0, no twin.
    attn.short_graphs = False
    assert graphs_with([1, 2], max_kv_indices=64).short_sizes == []
    plain = DecodeGraphs(None, attn, None, [1, 2], 40, 9, 4, 64, short_context=12)
    assert plain.short_context == 0 and plain.short_sizes == []


def test_padding_choice_for_graph_runs():
    graphs = graphs_with([1, 2, 4, 8], max_kv_indices=64)
    step = decode_step()
    assert graphs.padding_for(step) == DecodePadding(4, 40, 9, 4)
    b = StepBuilder(num_pages=40, page_size=4)
    assert graphs.padding_for(b.extend([(0, [1, 2, 3])])) is None  # extend steps run eagerly
    many = StepBuilder(num_pages=40, page_size=4)
    many.extend([(s, [1]) for s in range(9)])
    assert graphs.padding_for(many.decode(list(range(9)))) is None  # larger than every graph
    # The padded page list must fit the graph's fixed index buffer: 3 requests, 7 pages, 1 padding page.
    k = len(step.kv_indices)
    assert k == 7
    assert graphs_with([1, 2, 4, 8], max_kv_indices=k + 1).padding_for(step) is not None
    assert graphs_with([1, 2, 4, 8], max_kv_indices=k).padding_for(step) is None


def test_uploaded_padded_batch_puts_graph_inputs_at_fixed_offsets():
    step = decode_step()
    up = BatchUploader(capacity=512, device=torch.device("cpu"))
    pad = DecodePadding(rows=8, scratch_page=40, scratch_slot=9, page_size=4)
    batch = up.upload(step, pad)
    assert (batch.num_reqs, batch.num_tokens) == (8, 8) and batch.is_decode and batch.in_static_buffer
    base = batch.input_ids.data_ptr()
    assert batch.positions.data_ptr() == base + 8 * 4
    assert batch.out_loc.data_ptr() == base + 16 * 4
    # What a sampling graph reads: fixed too, before the first array whose size is not the row count.
    assert batch.req_slot.data_ptr() == base + 24 * 4
    assert batch.seq_len.data_ptr() == base + 32 * 4
    np.testing.assert_array_equal(batch.out_loc[:3].numpy(), step.out_loc)
    np.testing.assert_array_equal(batch.host_kv_indptr.numpy()[:4], step.kv_indptr)
    # The host views and longest lengths, worked out on first use, include the padding rows.
    np.testing.assert_array_equal(batch.host_seq_len.numpy()[:3], step.seq_len)
    assert batch.host_seq_len.numpy()[3:].tolist() == [1] * 5
    assert batch.host_qo_indptr.numpy().tolist() == list(range(9))
    assert batch.host_kv_last_page_len.shape == (8,)
    assert (batch.max_qo_len, batch.max_seq_len) == (1, int(step.seq_len.max()))


def test_device_arrays_are_cut_out_of_the_upload_when_first_read():
    """A step replayed from a graph reads none of its device arrays (the graph reads fixed addresses), so the
    upload makes none of them; each is a view of the uploaded words, at the size the padding gives it."""
    step = decode_step()
    up = BatchUploader(capacity=512, device=torch.device("cpu"))
    batch = up.upload(step, DecodePadding(rows=8, scratch_page=40, scratch_slot=9, page_size=4))
    assert "_device" not in vars(batch)
    assert batch.words.data_ptr() == batch.input_ids.data_ptr()
    assert batch.req_slot.tolist() == [*step.req_slot, 9, 9, 9, 9, 9]
    assert batch.kv_indices.tolist() == [*step.kv_indices, 40, 40, 40, 40, 40]
    assert [getattr(batch, name).shape[0] for name in NAMES] == list(batch.sizes)


def test_join_parameters_travel_with_the_second_upload():
    b = StepBuilder(num_pages=40, page_size=4)
    joins = [Join(3, 0.7, 0.9, 20, 2**64 - 5), Join(1, 0.0, 1.0, -1, 12345)]
    step = b.extend([(3, [1, 2]), (1, [3])], joins)
    up = BatchUploader(capacity=512, device=torch.device("cpu"))
    forward = up.upload(step)
    assert forward.joins is None
    batch = up.upload_joins(forward, step, {"token_slot": np.array([3, 3, 1])})
    # The forward's arrays stay where they were; the joins and extras follow them, 8-byte aligned.
    assert batch.input_ids.data_ptr() == forward.input_ids.data_ptr()
    assert batch.extra["token_slot"].tolist() == [3, 3, 1]
    end = forward.words.data_ptr() + forward.words.numel() * 4
    assert batch.join_words.data_ptr() >= end and batch.join_words.data_ptr() % 8 == 0
    j = batch.joins
    assert j.slot.tolist() == [3, 1]
    assert j.temperature.tolist() == pytest.approx([0.7, 0.0])
    assert j.top_p.tolist() == pytest.approx([0.9, 1.0])
    assert j.top_k.tolist() == [20, -1]
    assert j.seed.dtype == torch.int64
    assert j.seed.numpy().view(np.uint64).tolist() == [2**64 - 5, 12345]
    decode = b.decode([3, 1])
    assert up.upload_joins(up.upload(decode), decode).joins is None
