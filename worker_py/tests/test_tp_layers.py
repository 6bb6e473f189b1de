"""Sharded layers against the unsharded ones, on two gloo ranks: each rank builds both from the same
checkpoint tensors and compares what its shard computes (after the layer's all-reduce or all-gather) with
the whole layer's output."""

from __future__ import annotations

import pytest
import torch
from tp_ranks import run_ranks

from minisgl import tp
from minisgl.layers import GatedMLP, LayerOptions, Linear, LMHead, MoE, VocabEmbedding
from minisgl.layers.loading import ALL
from minisgl.worker.config import WorkerConfig


def _load(module: torch.nn.Module, name: str, tensor: torch.Tensor, shard=ALL) -> None:
    module.loaders[name][0](tensor, shard)


def _built(cls, *args, options: LayerOptions, **kw):
    with torch.device("meta"):
        module = cls(*args, options, **kw)
    return module.to_empty(device="cpu").requires_grad_(False)


def _linears(rank: int, ranks: int) -> dict[str, float]:
    """Max |difference| with the whole layer per case (0 where the result must be bit-exact)."""
    g = torch.Generator().manual_seed(0)
    one, mine = LayerOptions(torch.float32), LayerOptions(torch.float32, tp_rank=rank, tp_size=ranks)
    x = torch.randn(5, 16, generator=g)
    out = {}

    # Column parallel, merged q/k/v with 4 query heads and 1 KV head of size 4: K and V are replicated.
    sizes, q, k, v = [16, 4, 4], *(torch.randn(n, 16, generator=g) for n in (16, 4, 4))
    bias = torch.randn(24, generator=g)
    whole = _built(Linear, 16, sizes, options=one, bias=True, tp_dim=0, shards=("q", "k", "v"))
    part = tp.kv_part(1, ranks, rank)
    split = _built(
        Linear, 16, sizes, options=mine, bias=True, tp_dim=0, shards=("q", "k", "v"),
        parts=[(rank, ranks), part, part],
    )  # fmt: skip
    for layer in (whole, split):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _load(layer, "weight", t, name)
        _load(layer, "bias", bias)  # a merged bias stored whole
    full = whole(x)
    qs = 16 // ranks
    expect = torch.cat([full[:, rank * qs : (rank + 1) * qs], full[:, 16:20], full[:, 20:24]], dim=1)
    out["qkv"] = (split(x) - expect).abs().max().item()

    # Row parallel with a bias: the all-reduced partial sums, the bias counted once.
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    whole = _built(Linear, 16, 8, options=one, bias=True, tp_dim=1)
    split = _built(Linear, 16, 8, options=mine, bias=True, tp_dim=1)
    for layer in (whole, split):
        _load(layer, "weight", w)
        _load(layer, "bias", b)
    xs = x[:, rank * 16 // ranks : (rank + 1) * 16 // ranks]
    out["row"] = (split(xs) - whole(x)).abs().max().item()

    # The gated MLP: gate/up column parallel, down row parallel.
    gate, up, down = (torch.randn(*shape, generator=g) for shape in ((32, 16), (32, 16), (16, 32)))
    whole, split = _built(GatedMLP, 16, 32, options=one), _built(GatedMLP, 16, 32, options=mine)
    for mlp in (whole, split):
        _load(mlp.gate_up_proj, "weight", gate, "gate")
        _load(mlp.gate_up_proj, "weight", up, "up")
        _load(mlp.down_proj, "weight", down)
    out["mlp"] = (split(x) - whole(x)).abs().max().item()
    return out


def _vocab(rank: int, ranks: int, vocab: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    one, mine = LayerOptions(torch.float32), LayerOptions(torch.float32, tp_rank=rank, tp_size=ranks)
    table, head = torch.randn(vocab, 16, generator=g), torch.randn(vocab, 16, generator=g)
    ids = torch.tensor([0, vocab - 1, 3, vocab // 2, vocab - 1, 1])
    hidden = torch.randn(4, 16, generator=g)
    whole_e, split_e = (_built(VocabEmbedding, vocab, 16, options=o) for o in (one, mine))
    whole_h, split_h = (_built(LMHead, vocab, 16, options=o) for o in (one, mine))
    # Before loading: materialising the head materialises the embedding it holds again.
    tied = _built(LMHead, vocab, 16, options=mine, tied=split_e)
    for e, h in ((whole_e, whole_h), (split_e, split_h)):
        _load(e, "weight", table)
        _load(h, "weight", head)
    logits = split_h(hidden)
    assert logits.shape == (4, vocab) and logits.is_contiguous()
    return {
        "embedding": (split_e(ids) - whole_e(ids)).abs().max().item(),
        "head": (logits - whole_h(hidden)).abs().max().item(),
        "tied": (tied(hidden) - hidden @ table.T).abs().max().item(),
    }


def _moe(rank: int, ranks: int, stacked: bool) -> float:
    g = torch.Generator().manual_seed(2)
    one, mine = LayerOptions(torch.float32), LayerOptions(torch.float32, tp_rank=rank, tp_size=ranks)
    experts, hidden, inter = 4, 16, 8
    router = torch.randn(experts, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g)
    down = torch.randn(experts, hidden, inter, generator=g)
    whole, split = (_built(MoE, hidden, inter, experts, 2, True, options=o) for o in (one, mine))
    for moe in (whole, split):
        _load(moe.gate, "weight", router)
        if stacked:
            _load(moe.experts, "gate_up_proj", gate_up)
            _load(moe.experts, "down_proj", down)
            continue
        for e in range(experts):
            _load(moe.experts, "gate_up_proj", gate_up[e, :inter], ("gate", e))
            _load(moe.experts, "gate_up_proj", gate_up[e, inter:], ("up", e))
            _load(moe.experts, "down_proj", down[e], ("down", e))
    x = torch.randn(7, hidden, generator=g)
    return (split(x) - whole(x)).abs().max().item()


def _all(rank: int, ranks: int) -> dict:
    # One spawn for every case: starting the ranks costs more than the cases.
    return {
        "linear": _linears(rank, ranks),
        "vocab": [_vocab(rank, ranks, vocab) for vocab in (11, 12)],  # 11: the last slice is padded
        "moe": {stacked: _moe(rank, ranks, stacked) for stacked in (False, True)},
    }


@pytest.fixture(scope="module")
def ranks_results() -> list[dict]:
    return run_ranks(_all, 2)


def test_linear_layers_split_over_ranks_compute_the_whole(ranks_results):
    for got in ranks_results:
        assert got["linear"]["qkv"] == 0, "column-parallel rows are the whole layer's rows"
        assert got["linear"]["row"] < 1e-5 and got["linear"]["mlp"] < 1e-4, got


def test_vocabulary_split_pads_and_gathers_whole_rows(ranks_results):
    for got in (v for r in ranks_results for v in r["vocab"]):
        assert got["embedding"] == 0, "one rank contributes each row: the all-reduce adds only zeros"
        assert got["head"] < 1e-5 and got["tied"] < 1e-5, got


def test_experts_split_by_their_intermediate_dimension(ranks_results):
    for got in ranks_results:
        assert got["moe"][False] < 1e-4 and got["moe"][True] < 1e-4, "per-expert and stacked checkpoints"


def test_kv_heads_are_split_or_replicated():
    assert [tp.kv_part(8, 4, r) for r in range(4)] == [(r, 4) for r in range(4)]
    assert [tp.kv_part(2, 4, r) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert tp.local_kv_heads(2, 4) == 1 and tp.local_kv_heads(8, 4) == 2
    qwen = {"num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864}
    assert tp.problems(qwen, 2) == []
    assert tp.problems(qwen, 4) == ["its 14 attention heads do not split evenly over 4 ranks"]
    odd = {"num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 48}
    assert tp.problems(odd, 3) == ["its 4 KV heads do not split evenly over 3 ranks"]
    assert "cannot be replicated" in tp.problems(odd | {"num_key_value_heads": 3}, 4)[0]


def test_the_config_refuses_more_ranks_than_the_ring_reads_and_one_gpu_for_several():
    assert WorkerConfig(tp=4).tp == 4
    with pytest.raises(ValueError, match="at most 4"):
        WorkerConfig(tp=5)
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU"):
        WorkerConfig(tp=2, device="cuda:1")
    with pytest.raises(ValueError, match="tp must be positive"):
        WorkerConfig(tp=0)
