"""Token masks (structured output, min_tokens): every token a request's mask does not allow gets -inf before
sampling, rows without a mask are left exactly as they were, and a step without masks does nothing. The torch
path runs everywhere; the Triton kernel is checked against it on a GPU (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minisgl.proto.step import STEP_EXTEND, Capacity, StepLayout, StepSlot
from minisgl.sampling import Joins, SampleMode, SamplePlan, Sampler, masks

torch.set_num_threads(1)

VOCAB = 300  # not a multiple of 32: the last word has bits past the vocabulary
WORDS = -(-VOCAB // 32)


def bits_of(allowed: list[set[int]], words: int = WORDS, junk_tail: bool = True) -> np.ndarray:
    """uint32 [g * W] masks allowing exactly these ids; with `junk_tail`, bits past VOCAB are set too
    (they must be ignored)."""
    out = np.zeros((len(allowed), words), dtype=np.uint32)
    for row, ids in enumerate(allowed):
        for i in ids:
            out[row, i // 32] |= np.uint32(1 << (i % 32))
        if junk_tail:
            for i in range(VOCAB, words * 32):
                out[row, i // 32] |= np.uint32(1 << (i % 32))
    return out.reshape(-1)


def reference(logits: torch.Tensor, mask_row: list[int], allowed: list[set[int]]) -> torch.Tensor:
    out = logits.clone()
    for r, m in enumerate(mask_row):
        if m >= 0:
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[list(allowed[m])] = True
            out[r] = out[r].masked_fill(~keep, float("-inf"))
    return out


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, VOCAB, generator=g) * 3
    # Token 31 and 299 sit on a word's top bit (a negative int32 word) and on the last real id.
    allowed = [{0, 31, 32, 63, 299}, set(range(100, 200)), {7}]
    mask_row = [-1, 2, 0, -1, 1]
    return logits, mask_row, allowed


def test_masked_rows_keep_only_their_tokens_and_the_others_are_untouched():
    logits, mask_row, allowed = case()
    tm = masks.make(np.array(mask_row, np.int32), bits_of(allowed), WORDS, "cpu")
    got = masks.apply_token_masks(logits.clone(), tm)
    assert torch.equal(got, reference(logits, mask_row, allowed))
    for r in (0, 3):
        assert torch.equal(got[r], logits[r]), "a row without a mask is not touched"
    assert torch.isfinite(got[1]).sum() == 1 and got[1, 7] == logits[1, 7]
    assert torch.isfinite(got[2]).sum() == 5


def test_a_step_without_masks_has_none_to_upload():
    layout = StepLayout(Capacity(4, 8, 6, mask_words=WORDS))
    slot = StepSlot(layout, bytearray(layout.slot_bytes))
    slot.write_header(1, STEP_EXTEND, 2, 2, 0, 0)
    assert masks.host_parts(slot.view()) is None
    # Two requests, the second under mask 0.
    slot.mask_row[:2] = [-1, 0]
    slot.mask_bits[:WORDS] = bits_of([{5, 6}])
    slot.write_header(1, STEP_EXTEND, 2, 2, 0, 0, 0, 1)
    parts = masks.host_parts(slot.view())
    assert parts["mask_rows"].tolist() == [1] and parts["mask_which"].tolist() == [0]
    assert parts["mask_bits"].dtype == np.int32 and parts["mask_bits"].shape == (WORDS,)
    tm = masks.from_uploaded({k: torch.from_numpy(v) for k, v in parts.items()}, WORDS)
    assert tm.bits.shape == (1, WORDS)
    out = masks.apply_token_masks(torch.zeros(2, VOCAB), tm)
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5, 6]


def sampler_for(temperatures: list[float], seed: int = 3) -> tuple[Sampler, torch.Tensor]:
    sampler = Sampler(8, "cpu", vocab_size=VOCAB)
    n = len(temperatures)
    slots = np.arange(n)
    sampler.join(Joins.make(slots, temperatures, [1.0] * n, [-1] * n, [seed + i for i in range(n)]))
    return sampler, torch.from_numpy(slots.astype(np.int32))


@pytest.mark.parametrize("mode", [SampleMode.GREEDY, SampleMode.PLAIN, SampleMode.FILTERED])
def test_the_sampler_draws_only_allowed_tokens_and_unmasked_rows_draw_as_without_masks(mode):
    temperature = 0.0 if mode == SampleMode.GREEDY else 1.0
    logits, mask_row, allowed = case(1)
    sampler, slots = sampler_for([temperature] * 5)
    positions = torch.arange(5, dtype=torch.int32) + 10
    tm = masks.make(np.array(mask_row, np.int32), bits_of(allowed), WORDS, "cpu")
    plan = SamplePlan(mode=mode)
    with_masks = sampler.sample(logits, slots, positions, plan, tm)
    without = sampler.sample(logits, slots, positions, plan)
    for r, m in enumerate(mask_row):
        if m >= 0:
            assert int(with_masks[r]) in allowed[m]
        else:
            assert with_masks[r] == without[r]
    if mode == SampleMode.GREEDY:
        expected = reference(logits, mask_row, allowed).argmax(dim=-1)
        assert with_masks.tolist() == expected.int().tolist()
    assert torch.equal(logits, case(1)[0]), "the caller's logits are not modified"


def test_many_draws_stay_inside_the_mask():
    torch.manual_seed(0)
    allowed = [set(range(40, 60)) | {299}]
    sampler, slots = sampler_for([1.5] * 8, seed=11)
    logits = torch.randn(8, VOCAB) * 4
    tm = masks.make(np.zeros(8, np.int32), bits_of(allowed), WORDS, "cpu")
    seen = set()
    for pos in range(40):
        ids = sampler.sample(logits, slots, torch.full((8,), pos, dtype=torch.int32), SampleMode.PLAIN, tm)
        seen |= set(ids.tolist())
    assert seen <= allowed[0] and len(seen) > 3


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="the Triton mask kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_matches_the_torch_path(dtype):
    from minisgl.kernels import sampling as fused

    vocab = 151_936
    words = -(-vocab // 32)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, vocab, generator=g) * 3).to(dtype)
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, size=(8, words), dtype=np.uint64).astype(np.uint32)
    mask_row = np.full(64, -1, np.int32)
    mask_row[rng.choice(64, 8, replace=False)] = np.arange(8)
    cpu = masks.make(mask_row, bits.reshape(-1), words, "cpu")
    expected = masks.apply_token_masks(logits.float().clone(), cpu)
    dev = masks.make(mask_row, bits.reshape(-1), words, "cuda")
    got = logits.cuda()
    fused.apply_token_masks(got, dev.rows, dev.which, dev.bits)
    assert torch.equal(got.float().cpu(), expected.to(dtype).float())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_sampler_draws_only_allowed_tokens():
    logits, mask_row, allowed = case(2)
    sampler = Sampler(8, "cuda", vocab_size=VOCAB)
    slots = np.arange(5)
    sampler.join(Joins.make(slots, [1.0] * 5, [1.0] * 5, [-1] * 5, list(range(5))))
    tm = masks.make(np.array(mask_row, np.int32), bits_of(allowed), WORDS, "cuda")
    positions = torch.arange(5, dtype=torch.int32, device="cuda")
    ids = sampler.sample(
        logits.cuda(), torch.from_numpy(slots.astype(np.int32)).cuda(), positions, SampleMode.PLAIN, tm
    )
    for r, m in enumerate(mask_row):
        if m >= 0:
            assert int(ids[r]) in allowed[m]


def test_the_runner_samples_masked_rows_inside_their_masks_and_the_others_as_without(tmp_path):
    """Through the whole runner on the CPU (a tiny random Qwen2): the step's masks reach the sampler in the
    step's one upload; greedy rows without a mask give what a runner given no masks gives, and the masked row
    (greedy and sampled) stays inside its mask, which is far from what it would pick unmasked."""
    from fake_steps import Join, StepBuilder
    from tiny_qwen import cpu_config, make_tiny_qwen

    from minisgl.worker.runner import ModelRunner

    model_dir = make_tiny_qwen(tmp_path / "tiny", seed=4)
    runners = [ModelRunner(cpu_config(model_dir, 64, 4, 8, 64), show_progress=False) for _ in range(2)]
    vocab = runners[0].model_config.vocab_size
    words = -(-vocab // 32)
    allowed = [{3, 77, vocab - 1}, {200, 201}]
    bits = np.zeros((2, words), np.uint32)
    for row, ids in enumerate(allowed):
        for i in ids:
            bits[row, i // 32] |= np.uint32(1 << (i % 32))
    slots = [0, 1, 2, 3]
    joins = [Join(0), Join(1), Join(2, temperature=1.0, seed=9), Join(3)]
    reqs = [(s, [10 + s, 20 + s, 30 + s, 40 + s, 50 + s]) for s in slots]
    masked, plain = [], []
    for i, runner in enumerate(runners):
        b = StepBuilder(runner.num_pages, 4, seed=0)
        steps = [b.extend(reqs, joins)] + [b.decode(slots) for _ in range(4)]
        out = []
        for step in steps:
            if i == 0:  # slot 1 under mask 0 (greedy), slot 2 under mask 1 (sampled)
                step.mask_row = np.array([-1, 0, 1, -1], np.int32)
                step.mask_bits = bits.reshape(-1)
            out.append(runner.run_step(step).tolist())
        (masked if i == 0 else plain).append(out)
    masked, plain = np.array(masked[0]), np.array(plain[0])
    assert masked[:, 0].tolist() == plain[:, 0].tolist() and masked[:, 3].tolist() == plain[:, 3].tolist()
    assert set(masked[:, 1].tolist()) <= allowed[0] and set(masked[:, 2].tolist()) <= allowed[1]
    assert not set(plain[:, 1].tolist()) <= allowed[0], "the mask changed what the row picks"
