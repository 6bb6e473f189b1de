"""The sampler's GPU path (the fused penalty and Gumbel kernels) against its CPU path (torch references), with
every option mixed in one batch, float32 and bf16 logits. The CPU-against-CPU case runs everywhere (it checks
the test itself); the GPU case skips without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minisgl.sampling import Sampler

VOCAB = 5000  # not a multiple of the kernels' blocks

ROWS = [
    {"temperature": 0.9, "seed": 1, "min_p": 0.2, "logprobs": 5},
    {"temperature": 0.0, "repetition_penalty": 1.4},
    {"temperature": 1.3, "seed": 2, "top_k": 20, "presence_penalty": 1.5, "bias": [(5, 3.0), (4999, 2.0)]},
    {"temperature": 0.7, "seed": 3, "top_p": 0.8, "frequency_penalty": 0.8, "logprobs": 20},
    {"temperature": 1.0, "seed": 2**64 - 1},
    {"temperature": 0.0, "logprobs": 0},
    {"temperature": 1.1, "seed": 4, "bias": [(i, -4.0) for i in range(0, 300)]},
    {"temperature": 0.8, "seed": 5, "top_k": 50, "min_p": 0.05, "repetition_penalty": 0.8},
] * 4  # 32 rows, each option in several slots


def make(device: str) -> tuple[Sampler, torch.Tensor]:
    sampler = Sampler(len(ROWS) + 1, device, vocab_size=VOCAB)
    keys = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 0}
    cols = {k: [r.get(k, v) for r in ROWS] for k, v in keys.items()}
    off = {
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "logprobs": -1,
    }
    options = {k: [r.get(k, v) for r in ROWS] for k, v in off.items()}
    slots = np.arange(len(ROWS))
    sampler.set_params(slots, **cols, bias=[r.get("bias", []) for r in ROWS], **options)
    rng = np.random.default_rng(0)
    for slot in slots:
        ids = torch.from_numpy(rng.integers(0, 400, 60).astype(np.int32)).to(device)
        sampled = torch.from_numpy(np.arange(60) >= 40).to(device)
        sampler.count(
            torch.full((60,), int(slot), device=device), ids, torch.arange(60, device=device), sampled
        )
    return sampler, torch.from_numpy(slots.astype(np.int32)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_the_device_path_draws_what_the_cpu_path_draws(device, dtype):
    logits = (torch.randn(len(ROWS), VOCAB, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    # Most likely tokens among the counted ones, so that the penalties change draws.
    logits[:, :400] += 1.0
    positions = torch.arange(len(ROWS), dtype=torch.int32) * 3
    cpu, cpu_slots = make("cpu")
    dev, dev_slots = make(device)
    assert torch.equal(dev.counts.counts.cpu(), cpu.counts.counts)
    plan = cpu.plan_for(cpu_slots.numpy())
    assert plan == dev.plan_for(dev_slots.cpu().numpy())
    assert plan.bias and plan.penalties and plan.min_p and plan.top_logprobs == 20
    torch.testing.assert_close(
        dev.adjust(logits.to(device), dev_slots, plan).cpu(),
        cpu.adjust(logits, cpu_slots, plan),
        rtol=1e-6,
        atol=1e-5,
    )
    want = cpu.sample(logits, cpu_slots, positions, plan)
    got = dev.sample(logits.to(device), dev_slots, positions.to(device), plan)
    assert got.cpu().tolist() == want.tolist()
    lp, ids, values = Sampler.logprobs(logits, want, 20)
    d_lp, d_ids, d_values = Sampler.logprobs(logits.to(device), got, 20)
    torch.testing.assert_close(d_lp.cpu(), lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(d_values.cpu(), values, rtol=0, atol=1e-5)
    # The ids are the most likely tokens: each has the logprob reported beside it (ties may come in any
    # order).
    full = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(full.gather(1, d_ids.cpu().long()), d_values.cpu(), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_draw_compiles_once_whatever_the_offsets_of_its_arrays():
    """The positions come as a slice of the step's packed upload at any offset, and the rows' count changes
    from step to step: neither may compile a variant of the kernels in the middle of serving."""
    from minisgl.kernels import sampling as fused

    kernels = (fused._argmax_chunk_kernel, fused._argmax_rows_kernel)
    device = torch.cuda.current_device()
    if not all(hasattr(k, "device_caches") for k in kernels):
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    logits = torch.randn(16, VOCAB, device="cuda", dtype=torch.bfloat16)
    packed = torch.arange(64, dtype=torch.int32, device="cuda")
    temperature = torch.full((32,), 0.7, device="cuda")
    seed = torch.arange(16, dtype=torch.int64, device="cuda")

    def compiled() -> list[int]:
        return [len(k.device_caches[device][0]) for k in kernels]

    fused.sample_argmax(logits[:3], temperature[:3], seed[:3], packed[:3])
    before = compiled()
    for offset in range(1, 9):
        for n in (1, 5, 16):
            fused.sample_argmax(logits[:n], temperature[offset : offset + n], seed[:n], packed[offset:][:n])
    torch.cuda.synchronize()
    assert compiled() == before
