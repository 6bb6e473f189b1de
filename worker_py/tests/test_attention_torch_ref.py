"""The torch reference backend against a naive per-request attention written from the definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fake_steps import StepBuilder

from minisgl.attention import create_backend, resolve
from minisgl.attention.base import AttentionConfig
from minisgl.worker.batch import BatchUploader
from minisgl.worker.kv_cache import KVCache, KVCacheShape

torch.set_num_threads(1)

HQ, HKV, D, PAGE, PAGES = 4, 2, 8, 4, 64


def naive_attention(q, keys, values, prefix_len):
    """q [m, Hq, D] for positions prefix_len.., keys/values [L, Hkv, D] for positions 0..L-1."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q, keys) / math.sqrt(q.shape[-1])
    q_pos = prefix_len + torch.arange(q.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(keys.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hml,lhd->mhd", scores.softmax(-1), values)


def setup(layers=2):
    cache = KVCache(KVCacheShape(layers, PAGE, HKV, D, torch.float32), PAGES, "cpu")
    backend = create_backend("torch", "torch", AttentionConfig(HQ, HKV, D, PAGE), cache)
    return cache, backend, BatchUploader(4096, torch.device("cpu"))


def forward(backend, layer, q, k, v):
    """What an attention layer does: write the new K/V where the plan says, then attend."""
    backend.kv_cache.store(layer, k, v, backend.out_loc)
    return backend.attend(layer, q)


def test_matches_naive_attention_over_scattered_pages():
    torch.manual_seed(0)
    cache, backend, uploader = setup()
    b = StepBuilder(PAGES, PAGE, seed=7)
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(step, layer=1):
        t = len(step.input_ids)
        q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
        batch = uploader.upload(step)
        backend.plan(batch)
        out = forward(backend, layer, q, k, v)
        for r, slot in enumerate(step.req_slot.tolist()):
            lo, hi = step.qo_indptr[r], step.qo_indptr[r + 1]
            old_k, old_v = history.get(slot, (torch.empty(0, HKV, D), torch.empty(0, HKV, D)))
            all_k, all_v = torch.cat([old_k, k[lo:hi]]), torch.cat([old_v, v[lo:hi]])
            history[slot] = (all_k, all_v)
            expected = naive_attention(q[lo:hi], all_k, all_v, len(old_k))
            torch.testing.assert_close(out[lo:hi], expected, atol=1e-5, rtol=1e-5)

    # Prefills of different lengths, then a mixed step (a chunk on top of a cached prefix beside decodes),
    # then pure decodes.
    run(b.extend([(0, [1] * 7), (1, [1] * 1), (2, [1] * 12)]))
    run(b.extend([(3, [1] * 5), (0, [1]), (2, [1] * 6), (1, [1])]))
    for _ in range(5):
        run(b.decode([2, 0, 3, 1]))


def test_writes_new_kv_at_out_loc_of_its_layer_only():
    cache, backend, uploader = setup()
    b = StepBuilder(PAGES, PAGE, seed=8)
    step = b.extend([(0, [1] * 6), (1, [1] * 3)])
    k, v = torch.randn(9, HKV, D), torch.randn(9, HKV, D)
    backend.plan(uploader.upload(step))
    forward(backend, 0, torch.randn(9, HQ, D), k, v)
    loc = torch.from_numpy(step.out_loc).long()
    torch.testing.assert_close(cache.flat_k(0)[loc], k)
    torch.testing.assert_close(cache.flat_v(0)[loc], v)
    # Page p, offset o of the NHD layout is flat location p * page_size + o.
    page, off = divmod(int(step.out_loc[4]), PAGE)
    torch.testing.assert_close(cache.k(0)[page, off], k[4])
    assert cache.k(1).abs().sum() == 0 and cache.v(1).abs().sum() == 0


def test_stale_pages_do_not_leak():
    """Garbage in pages a request does not own, or past its length in its last page, changes nothing."""
    cache, backend, uploader = setup(layers=1)
    cache.k(0).fill_(1e4)
    cache.v(0).fill_(-1e4)
    step = StepBuilder(PAGES, PAGE, seed=9).extend([(0, [1] * 5), (1, [1] * 2)])
    backend.plan(uploader.upload(step))
    q, k, v = torch.randn(7, HQ, D), torch.randn(7, HKV, D), torch.randn(7, HKV, D)
    out = forward(backend, 0, q, k, v)
    expected0 = naive_attention(q[:5], k[:5], v[:5], 0)
    expected1 = naive_attention(q[5:], k[5:], v[5:], 0)
    torch.testing.assert_close(out, torch.cat([expected0, expected1]), atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_rejected():
    cache = KVCache(KVCacheShape(1, PAGE, HKV, D, torch.float32), 4, "cpu")
    with pytest.raises(ValueError, match="unknown prefill attention backend 'nope'"):
        resolve("nope", "auto", "cpu")
    assert resolve("triton", "auto", "cuda") == ("triton", "triton")  # ours for both kinds of step
    with pytest.raises(ValueError, match="page size"):
        create_backend("torch", "torch", AttentionConfig(HQ, HKV, D, PAGE * 2), cache)


def test_kv_cache_is_zeroed_and_sized_from_a_budget():
    shape = KVCacheShape(num_layers=3, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    assert shape.bytes_per_page == 2 * 3 * 4 * 2 * 8 * 2 + 4 * 4  # K and V, and each token's id
    assert shape.pages_for_budget(10 * shape.bytes_per_page + 5) == 10
    cache = KVCache(shape, 10, "cpu")
    assert cache.k(2).shape == (10, 4, 2, 8) and cache.k(2).is_contiguous()
    assert cache.nbytes == 10 * shape.bytes_per_page
    assert np.all(cache.v(1).float().numpy() == 0)
