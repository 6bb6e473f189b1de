"""Checks of `minisgl.kernels.moe`'s Triton path against its torch reference, shared by the GPU tests (run
in-process) and the CPU tests (run by Triton's interpreter in a subprocess: `python -c "import moe_check;
moe_check.run_group('small', 'cpu')"` with TRITON_INTERPRET=1, which must be set before triton is imported).

Every check raises AssertionError on a mismatch; `run_group` prints "ok" when a whole group passed.
"""

from __future__ import annotations

import torch

from minisgl.kernels import moe

BF16 = torch.bfloat16
F32 = torch.float32


def make_case(t, num_experts, k, hidden, inter, dtype, device, seed=0):
    """Random x, experts (scaled so that activations stay O(1)), and a routing from random logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, hidden, generator=g).to(dtype).to(device)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype).to(device)
    logits = torch.randn(t, num_experts, generator=g).to(device)
    weights, ids = moe.route(logits, k, renormalize=True)
    return x, w13, w2, weights, ids


def assert_moe_close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """bf16: within a couple of bf16 steps of the output's scale, and bit-equal almost everywhere (the GEMMs
    add their products in another order than cuBLAS/MKL, so a value near a rounding boundary may round the
    other way); float32: to float32 rounding error."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.dtype)
    assert torch.isfinite(got).all(), what
    g, w = got.float(), want.float()
    scale = w.abs().max().item() + 1e-6
    if got.dtype == torch.float32:
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")
        return
    torch.testing.assert_close(g, w, rtol=2**-6, atol=2**-6 * scale, msg=lambda m: f"{what}: {m}")
    equal = (got == want).float().mean().item()
    assert equal >= 0.9, (what, "bit-equal fraction", equal)


def check_fused(t, num_experts, k, hidden, inter, dtype, device, tile=None, seed=0) -> None:
    x, w13, w2, weights, ids = make_case(t, num_experts, k, hidden, inter, dtype, device, seed)
    want = moe.moe_reference(x, w13, w2, weights, ids)
    got = moe.fused_moe(x, w13, w2, weights, ids, tile=tile)
    assert_moe_close(got, want, (t, num_experts, k, hidden, inter, dtype, tile))


def check_alignment(al: moe.Alignment, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """The invariants the GEMM kernels rely on: every pair exactly once, in its expert's run, runs padded
    with the pad value to whole blocks, in expert order, pairs ascending within an expert (stable)."""
    flat = ids.reshape(-1).long().cpu()
    num_pairs = flat.numel()
    sorted_pairs = al.sorted_pairs.long().cpu()
    block_expert = al.block_expert.long().cpu()
    total = int(al.total.item())
    cap = moe.align_capacity(num_pairs, num_experts, block_m)
    assert sorted_pairs.numel() == cap and block_expert.numel() == cap // block_m
    assert total % block_m == 0 and total <= cap
    counts = torch.bincount(flat, minlength=num_experts)
    assert total == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert (sorted_pairs[total:] == num_pairs).all(), "slots past the total must be padding"
    assert (block_expert[total // block_m :] == num_experts).all(), "blocks past the total: expert E"
    live = sorted_pairs[:total]
    real = live[live < num_pairs]
    assert torch.equal(real.sort().values, torch.arange(num_pairs)), "every pair exactly once"
    experts_in_order = []
    for b in range(total // block_m):
        e = int(block_expert[b])
        rows = sorted_pairs[b * block_m : (b + 1) * block_m]
        rows = rows[rows < num_pairs]
        assert (flat[rows] == e).all(), f"block {b} holds pairs of another expert than {e}"
        if not experts_in_order or experts_in_order[-1] != e:
            experts_in_order.append(e)
    assert experts_in_order == sorted(set(experts_in_order)), "one run per expert, in expert order"
    for e in range(num_experts):
        blocks = (block_expert[: total // block_m] == e).nonzero().flatten()
        run = torch.cat(
            [sorted_pairs[b * block_m : (b + 1) * block_m] for b in blocks.tolist()] or [live[:0]]
        )
        n = int(counts[e])
        assert run.numel() == (n + block_m - 1) // block_m * block_m
        assert torch.equal(run[:n], (flat == e).nonzero().flatten()), f"expert {e}: pairs first, ascending"
        assert (run[n:] == num_pairs).all()


ALIGN_SHAPES = [  # (t, E, k, block_m)
    (1, 8, 2, 16),
    (1, 128, 8, 16),
    (3, 8, 2, 16),
    (37, 16, 4, 16),
    (100, 64, 8, 32),
    (200, 128, 8, 16),
    (5, 3, 3, 64),
    (64, 4, 2, 128),
    (2048, 128, 8, 64),  # chunks of 2048 pairs
    (700, 8, 2, 16),
]


def check_align_paths(device: str) -> None:
    """The one-program Triton align and torch's sort give the same buffers, and both the invariants."""
    g = torch.Generator().manual_seed(1)
    for t, num_experts, k, block_m in ALIGN_SHAPES:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(t)]).int()
        if t == 64:  # a skewed routing: most pairs on one expert
            ids[:, 0] = 0
        ids = ids.to(device)
        by_kernel = moe.align(ids, num_experts, block_m, use_kernel=True)
        by_torch = moe.align(ids, num_experts, block_m, use_kernel=False)
        check_alignment(by_torch, ids, num_experts, block_m)
        for a, b, name in zip(by_kernel, by_torch, moe.Alignment._fields, strict=True):
            assert torch.equal(a, b), (t, num_experts, k, block_m, name, a, b)


def check_graph(t: int = 16, device: str = "cuda") -> None:
    """fused_moe captured once replays right for another x and another routing (no host sync, no shape
    that depends on the routing)."""
    num_experts, k, hidden, inter = 64, 8, 512, 200
    x, w13, w2, weights, ids = make_case(t, num_experts, k, hidden, inter, BF16, device, seed=0)
    x2, _, _, weights2, ids2 = make_case(t, num_experts, k, hidden, inter, BF16, device, seed=1)
    ids2[:, 0] = 3  # a skewed second routing: a different number of blocks than the first
    out = moe.fused_moe(x, w13, w2, weights, ids)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w13, w2, weights, ids)
    for src_x, src_w, src_ids in ((x2, weights2, ids2), (x.clone(), weights.clone(), ids.clone())):
        x.copy_(src_x)
        weights.copy_(src_w)
        ids.copy_(src_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_moe_close(out, moe.moe_reference(x, w13, w2, weights, ids), "graph replay")


TILES = [moe.SMALL_TILE, moe.MEDIUM_TILE, moe.WIDE_TILE, moe.LARGE_TILE]

# Groups for the interpreter (each a few seconds to ~20 s on two CPU cores): t=1 and t=3, E up to 128,
# I not a multiple of any block, float32 and bf16, both align paths, every tile.
INTERPRETED_GROUPS = {
    "small": [
        (1, 8, 2, 64, 48, BF16),
        (3, 8, 2, 64, 48, BF16),
        (1, 128, 8, 128, 40, BF16),
        (5, 8, 2, 64, 40, F32),
    ],
    "medium": [
        (33, 16, 4, 128, 80, BF16),
        (17, 64, 8, 64, 40, BF16),
        (256, 8, 2, 64, 40, BF16),
    ],
    # 65 rows per expert, several 2048-pair chunks in the align kernel.
    "large": [(520, 16, 8, 64, 40, BF16)],
}


def run_group(group: str, device: str) -> None:
    if group == "align":
        check_align_paths(device)
    elif group == "tiles":
        for tile in TILES:
            check_fused(40, 8, 4, 64, 72, BF16, device, tile=tile)
    elif group == "empty":
        x, w13, w2, weights, ids = make_case(0, 8, 2, 64, 48, BF16, device)
        assert moe.fused_moe(x, w13, w2, weights, ids).shape == (0, 64)
    else:
        for shape in INTERPRETED_GROUPS[group]:
            check_fused(*shape, device)
    print("ok")
