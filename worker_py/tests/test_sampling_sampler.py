"""The sampler: greedy, filters with HF's semantics, seeded reproducibility, and the sampled distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minisgl.sampling import SampleMode, Sampler
from minisgl.sampling.sampler import _top_k_top_p

torch.set_num_threads(1)


def make_sampler(n, temperature=1.0, top_p=1.0, top_k=-1, seeds=None, slots=None):
    slots = np.arange(n) if slots is None else np.asarray(slots)
    sampler = Sampler(max_slots=int(slots.max()) + 1, device="cpu")
    full = lambda x, dt: np.broadcast_to(np.asarray(x, dtype=dt), (n,)).copy()  # noqa: E731
    seeds = np.arange(n, dtype=np.uint64) if seeds is None else np.asarray(seeds, dtype=np.uint64)
    sampler.set_params(
        slots, full(temperature, np.float32), full(top_p, np.float32), full(top_k, np.int32), seeds
    )
    return sampler, torch.from_numpy(slots.astype(np.int32))


def test_temperature_zero_is_argmax_in_every_mode():
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    sampler, slots = make_sampler(16, temperature=0.0, top_k=5, top_p=0.5)
    pos = torch.arange(16, dtype=torch.int32)
    assert sampler.mode_for(slots.numpy()) == SampleMode.GREEDY
    for mode in SampleMode:
        out = sampler.sample(logits, slots, pos, mode)
        assert out.dtype == torch.int32
        assert torch.equal(out, logits.argmax(-1).int())


def test_top_k_one_is_greedy():
    logits = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    sampler, slots = make_sampler(32, temperature=1.5, top_k=1)
    out = sampler.sample(logits, slots, torch.full((32,), 9, dtype=torch.int32), SampleMode.FILTERED)
    assert torch.equal(out, logits.argmax(-1).int())


def test_mixed_greedy_and_sampled_rows_in_one_pass():
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(2)) * 0.1
    temps = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.float32)
    sampler, slots = make_sampler(8, temperature=temps)
    out = sampler.sample(logits, slots, torch.zeros(8, dtype=torch.int32), sampler.mode_for(slots.numpy()))
    greedy = logits.argmax(-1).int()
    assert torch.equal(out[0::2], greedy[0::2])
    # Near-uniform logits over 300 tokens: sampled rows all on the argmax would mean no sampling happened.
    assert not torch.equal(out[1::2], greedy[1::2])


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (-1, 0.6), (10, 0.8), (0, 0.3)])
def test_filters_keep_what_hf_warpers_keep(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 40, generator=gen) * 3
    ours = _top_k_top_p(logits, torch.full((64,), top_k), torch.full((64,), top_p))
    ref = logits
    if top_k > 0:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_samples_stay_inside_top_k_and_nucleus():
    n, vocab = 4000, 30
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4)).expand(n, vocab) * 2
    order = logits[0].argsort(descending=True)
    probs = logits[0].softmax(-1)[order]
    sampler, slots = make_sampler(n, top_k=8)
    out = sampler.sample(logits, slots, torch.zeros(n, dtype=torch.int32))
    assert set(out.tolist()) == set(
        order[:8].tolist()
    )  # inside the top 8, and every one of them is reachable
    # Nucleus: the smallest prefix of the sorted probabilities that reaches top_p.
    top_p = float(probs[:3].sum() + probs[3] / 2)
    sampler, slots = make_sampler(n, top_p=top_p)
    out = sampler.sample(logits, slots, torch.zeros(n, dtype=torch.int32))
    assert set(out.tolist()) == set(order[:4].tolist())


def test_same_seed_and_position_same_token_in_any_batch_or_order():
    vocab = 1000
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(6, vocab, generator=gen)
    seeds = np.array([7, 2**64 - 1, 123456789012345, 0, 42, 2**63], dtype=np.uint64)
    pos = torch.tensor([3, 17, 0, 99, 5, 2**20], dtype=torch.int32)
    params = dict(
        temperature=[1.0, 0.7, 1.3, 1.0, 0.9, 2.0],
        top_k=[-1, 50, -1, 5, -1, 0],
        top_p=[1, 1, 0.9, 1, 1, 0.95],
    )
    sampler, slots = make_sampler(6, seeds=seeds, **{k: np.asarray(v) for k, v in params.items()})
    together = sampler.sample(rows, slots, pos, SampleMode.FILTERED)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = sampler.sample(rows[perm], slots[perm], pos[perm], SampleMode.FILTERED)
    assert torch.equal(shuffled, together[perm])
    for i in range(6):
        alone = sampler.sample(
            rows[i : i + 1], slots[i : i + 1], pos[i : i + 1], sampler.mode_for(slots.numpy()[i : i + 1])
        )
        assert alone.item() == together[i].item()
    # A request stored in another slot, next to other requests, still draws the same token.
    other, other_slots = make_sampler(1, seeds=seeds[1:2], temperature=0.7, top_k=50, slots=[11])
    assert other.sample(rows[1:2], other_slots, pos[1:2]).item() == together[1].item()


def test_plain_and_filtered_paths_agree_on_unfiltered_rows():
    logits = torch.randn(50, 200, generator=torch.Generator().manual_seed(6))
    sampler, slots = make_sampler(50, temperature=0.8)
    pos = torch.arange(50, dtype=torch.int32)
    assert sampler.mode_for(slots.numpy()) == SampleMode.PLAIN
    plain = sampler.sample(logits, slots, pos, SampleMode.PLAIN)
    assert torch.equal(plain, sampler.sample(logits, slots, pos, SampleMode.FILTERED))


def test_different_seeds_and_positions_draw_differently():
    vocab, n = 1000, 64
    logits = torch.zeros(n, vocab)
    sampler, slots = make_sampler(n)
    by_seed = sampler.sample(logits, slots, torch.zeros(n, dtype=torch.int32))
    assert len(set(by_seed.tolist())) > n * 0.9
    one_seed, one_slots = make_sampler(n, seeds=np.full(n, 77))
    by_pos = one_seed.sample(logits, one_slots, torch.arange(n, dtype=torch.int32))
    assert len(set(by_pos.tolist())) > n * 0.9


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, -1, 1.0), (1.0, 4, 1.0), (1.3, -1, 0.8)])
def test_empirical_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    n = 40000
    base = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.0, 0.0])
    sampler, slots = make_sampler(n, temperature=temperature, top_k=top_k, top_p=top_p)
    logits = base.expand(n, -1)
    # Half the draws vary the seed, half the position of one seed: both must be distributed alike.
    positions = torch.cat([torch.zeros(n // 2, dtype=torch.int32), torch.arange(n // 2, dtype=torch.int32)])
    seeds = np.concatenate([np.arange(n // 2), np.full(n // 2, 5)]).astype(np.uint64)
    sampler.set_params(
        np.arange(n),
        np.full(n, temperature, np.float32),
        np.full(n, top_p, np.float32),
        np.full(n, top_k, np.int32),
        seeds,
    )
    counts = torch.bincount(sampler.sample(logits, slots, positions).long(), minlength=6).double()
    filtered = _top_k_top_p((base / temperature)[None], torch.tensor([top_k]), torch.tensor([top_p]))[0]
    expected = filtered.softmax(-1).double() * n
    kept = expected > 0
    assert torch.all(counts[~kept] == 0)
    chi2 = (((counts - expected) ** 2)[kept] / expected[kept]).sum().item()
    # 99.9th percentile of chi-square with at most 5 degrees of freedom.
    assert chi2 < 20.5, (counts, expected)


def test_noise_is_finite_at_the_extreme_hashes():
    from minisgl.sampling.noise import uniform

    u = uniform(torch.tensor([0, 1 << 9, 0xFFFFFFFF - (1 << 9), 0xFFFFFFFF], dtype=torch.int64))
    assert torch.all((u > 0) & (u < 1))
    assert torch.all(torch.isfinite(-torch.log(-torch.log(u))))


def test_noise_hash_is_a_bijection_on_32_bits():
    from minisgl.sampling.noise import mix32

    x = torch.arange(1 << 20, dtype=torch.int64) * 4093  # spread over the 32-bit range
    h = mix32(x & 0xFFFFFFFF)
    assert h.min() >= 0 and h.max() < (1 << 32)
    assert torch.unique(h).numel() == x.numel()
