"""Qwen3-MoE's experts (`minisgl.kernels.moe`): routing and the torch reference against HF transformers' own
modules on the CPU; the Triton path against the reference through Triton's interpreter on the CPU (in a
subprocess: the interpreter is chosen when kernels are defined) and for real on a GPU when there is one."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from kernel_check import run_kernel_check

from minisgl.kernels import moe

# The bit-for-bit comparisons with HF hold when both sides' CPU matmuls reduce in the same order: with two
# threads, HF's grouped call and our per-expert calls split their work differently (4 of 8 cases differed by
# 1e-6 when this file ran alone; the rest of the suite had set one thread before it).
torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf  # noqa: E402

HAS_TRITON = moe.triton is not None
CUDA = torch.cuda.is_available()


def hf_config(num_experts=8, top_k=2, hidden=32, inter=24, norm_topk_prob=True, impl="grouped_mm"):
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
    )
    cfg._experts_implementation = impl
    return cfg


def hf_block(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    block = hf.Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.0)
        block.experts.gate_up_proj.normal_(0, cfg.hidden_size**-0.5)
        block.experts.down_proj.normal_(0, cfg.moe_intermediate_size**-0.5)
    return block.to(dtype).eval()


def ours(block, x2d, top_k, renormalize):
    """Our layer's computation with the block's weights: router logits as HF computes them, then ours."""
    logits = torch.nn.functional.linear(x2d, block.gate.weight)
    weights, ids = moe.route(logits, top_k, renormalize)
    return moe.moe_reference(x2d, block.experts.gate_up_proj, block.experts.down_proj, weights, ids)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (128, 8)])
def test_route_matches_hf_router(renormalize, dtype, num_experts, top_k):
    cfg = hf_config(num_experts, top_k, hidden=64, norm_topk_prob=renormalize)
    router = hf.Qwen3MoeTopKRouter(cfg).to(dtype)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(50, 64).to(dtype)
        logits, hf_weights, hf_ids = router(x)
    weights, ids = moe.route(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (50, top_k)
    assert torch.equal(ids.long(), hf_ids)
    # HF casts the float32 weights to the logits' dtype; before that cast they are ours, bit for bit.
    assert torch.equal(weights.to(dtype), hf_weights)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(50))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("num_experts", "top_k", "tokens"), [(8, 2, 1), (8, 2, 37), (16, 4, 3), (64, 8, 40)])
def test_reference_is_hf_grouped_mm_in_float32_bit_for_bit(renormalize, num_experts, top_k, tokens):
    """HF's default experts implementation (what from_pretrained picks): our reference gives its bits."""
    cfg = hf_config(num_experts, top_k, norm_topk_prob=renormalize)
    block = hf_block(cfg, torch.float32)
    x = torch.randn(1, tokens, cfg.hidden_size)
    with torch.no_grad():
        want = block(x)[0]
        got = ours(block, x[0], top_k, renormalize)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("tokens", [1, 29])
def test_reference_is_hf_grouped_mm_in_bf16_bit_for_bit(tokens):
    cfg = hf_config(16, 4)
    block = hf_block(cfg, torch.bfloat16)
    x = torch.randn(1, tokens, cfg.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        want = block(x)[0]
        got = ours(block, x[0], 4, True)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_hf_from_pretrained_default_is_grouped_mm():
    """Which HF implementation the reference follows: a model's default (it decides the k-sum's rounding)."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    model = hf.Qwen3MoeForCausalLM(cfg)
    assert model.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_reference_is_close_to_hf_eager(dtype, tol):
    """HF's eager loop adds the experts' outputs in ascending expert id with `index_add_` in the hidden dtype
    (so bf16 rounds after every add); the grouped_mm sum rounds once. Same up to that."""
    cfg = hf_config(16, 4, impl="eager")
    block = hf_block(cfg, dtype)
    x = torch.randn(1, 45, cfg.hidden_size).to(dtype)
    with torch.no_grad():
        want = block(x)[0].float()
        got = ours(block, x[0], 4, True).float()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def test_reference_handles_unrouted_experts_and_empty_batches():
    x = torch.randn(4, 16)
    w13, w2 = torch.randn(8, 24, 16), torch.randn(8, 16, 12)
    ids = torch.tensor([[5, 2]] * 4, dtype=torch.int32)  # six experts get nothing
    weights = torch.full((4, 2), 0.5)
    got = moe.moe_reference(x, w13, w2, weights, ids)
    want = torch.zeros(4, 16)
    for e in (5, 2):
        gate, up = (x @ w13[e].T).chunk(2, -1)
        want += 0.5 * ((torch.nn.functional.silu(gate) * up) @ w2[e].T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert moe.moe_reference(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)


def test_torch_align_keeps_its_invariants():
    """The align step's torch path on the CPU (the Triton path is compared with it in the kernel checks)."""
    import moe_check

    g = torch.Generator().manual_seed(0)
    for t, num_experts, k, block_m in moe_check.ALIGN_SHAPES + [(1, 4, 4, 16)]:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(t)]).int()
        moe_check.check_alignment(moe._align_torch(ids.reshape(-1), num_experts, block_m,
                                                   moe.align_capacity(ids.numel(), num_experts, block_m)),
                                  ids, num_experts, block_m)  # fmt: skip


def test_tile_for_grows_with_the_batch():
    small, large = moe.tile_for(1, 8, 128, 768), moe.tile_for(2048, 8, 128, 768)
    assert small.block_m == 16 and large.block_m >= 64
    for e, k, inter in ((128, 8, 768), (8, 2, 512), (64, 8, 256)):
        m = [moe.tile_for(t, k, e, inter).block_m for t in range(1, 5000)]
        assert m == sorted(m)


# --------------------------------------------------------------------------- Triton, interpreted (CPU)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CHECK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import moe_check
    moe_check.run_group({group!r}, {device!r})
    """
)
INTERPRETED = ["align", "tiles", "empty", "small", "medium", "large"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(CUDA, reason="the GPU tests below run the compiled kernels")
@pytest.mark.parametrize("group", INTERPRETED)
def test_fused_moe_matches_the_reference_interpreted(group):
    # Only without a GPU, as the other kernel tests: the interpreter pinned here (Triton 3.9) is the one
    # these checks were written against.
    run_kernel_check(CHECK.format(tests=TESTS_DIR, group=group, device="cpu"), interpret=True)


# ---------------------------------------------------------------------------------------- Triton, GPU

needs_gpu = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

GPU_SHAPES = [  # (t, E, k, H, I): Qwen3-30B-A3B's experts, smaller ones, I not a multiple of any block
    (1, 128, 8, 2048, 768),
    (3, 128, 8, 2048, 768),
    (256, 128, 8, 2048, 768),
    (2048, 128, 8, 2048, 768),
    (1, 8, 2, 1024, 352),
    (3, 64, 8, 1024, 200),
    (256, 64, 8, 1024, 200),
    (256, 8, 2, 512, 1000),
    (33, 64, 6, 256, 100),
    (700, 16, 4, 768, 176),
]


@needs_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "t{}-E{}-k{}-H{}-I{}".format(*s))
def test_fused_moe_matches_the_reference_on_the_gpu_bf16(shape):
    import moe_check

    moe_check.check_fused(*shape, torch.bfloat16, "cuda")


@needs_gpu
@pytest.mark.parametrize("shape", [(3, 8, 2, 256, 100), (64, 16, 4, 256, 96)])
def test_fused_moe_matches_the_reference_on_the_gpu_float32(shape):
    import moe_check

    moe_check.check_fused(*shape, torch.float32, "cuda")


@needs_gpu
@pytest.mark.parametrize("group", ["align", "tiles", "empty"])
def test_fused_moe_parts_on_the_gpu(group):
    import moe_check

    moe_check.run_group(group, "cuda")


@needs_gpu
@pytest.mark.parametrize("tokens", [16, 600])
def test_fused_moe_replays_in_a_cuda_graph(tokens):
    import moe_check

    moe_check.check_graph(tokens, "cuda")
