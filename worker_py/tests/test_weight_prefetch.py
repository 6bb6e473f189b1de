"""The L2 weight prefetch of captured forwards (`kernels/prefetch.py`, `models/prefetch.py`): the chunk table
covers each weight, the plan prefetches every layer's weights once and a layer ahead, the kernel compiles for
Hopper to the prefetch instructions (offline, no GPU needed), and on a GPU the graphs that prefetch compute
exactly what the ones that do not compute (test_gpu_paths.py)."""

from __future__ import annotations

import pytest
import torch

from minisgl.kernels import prefetch
from minisgl.layers import LayerOptions
from minisgl.models import build_model
from minisgl.models.config import ModelConfig
from minisgl.models.prefetch import points


def test_the_table_covers_each_tensor_in_aligned_chunks():
    a = torch.empty(10_000, dtype=torch.bfloat16)
    b = torch.empty(3, 40_000, dtype=torch.float32)[1]  # a view starting inside its storage
    for mode in prefetch.MODES:
        table = prefetch.PrefetchTable([a, b], mode)
        starts, sizes = table.addresses.tolist(), table.sizes.tolist()
        assert all(s % 16 == 0 for s in starts) and all(
            0 < n <= prefetch.CHUNK[mode] and n % 16 == 0 for n in sizes
        )
        covered = set()
        for t in (a, b):
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            mine = [(s, n) for s, n in zip(starts, sizes, strict=True) if lo <= s < hi]
            # Contiguous from the first 16-byte boundary to the last, nothing past the tensor.
            assert mine[0][0] - lo < 16 and hi - (mine[-1][0] + mine[-1][1]) < 16
            assert all(s + n == s2 for (s, n), (s2, _) in zip(mine, mine[1:], strict=False))
            covered.update(mine)
        assert len(covered) == len(table) and table.nbytes == sum(sizes)
    with pytest.raises(ValueError, match="prefetch mode"):
        prefetch.PrefetchTable([a], "all")


def model(arch: str, **hf):
    cfg = {
        "architectures": [arch],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    } | hf
    return build_model(ModelConfig.from_hf_dict(cfg), LayerOptions(torch.float32), "cpu")


def test_each_layer_is_prefetched_once_a_half_layer_ahead():
    m = model("Qwen2ForCausalLM")
    stages = [layer.weight_stages() for layer in m.model.layers]
    plan = points(stages)
    ids = [[id(t) for t in p] for p in plan]
    layer_weights = [id(p) for layer in m.model.layers for p in layer.parameters()]
    # Every weight of every layer, each exactly once.
    assert sorted(i for p in ids for i in p) == sorted(layer_weights)
    first = m.model.layers[0]
    assert ids[0][:2] == [id(first.input_layernorm.weight), id(first.self_attn.qkv_proj.weight)]
    for i, layer in enumerate(m.model.layers):
        attention, mlp = ({id(t) for t in s} for s in stages[i])
        assert id(layer.self_attn.o_proj.weight) in attention and id(layer.mlp.down_proj.weight) in mlp
        # Before layer i: its MLP, then layer i+1's attention.
        assert mlp <= set(ids[i])
        if i + 1 < len(stages):
            assert {id(t) for t in stages[i + 1][0]} <= set(ids[i])


def test_a_mixtures_experts_are_not_prefetched():
    m = model(
        "Qwen3MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=16,
    )
    layer = m.model.layers[0]
    _, mlp = layer.weight_stages()
    experts = {id(p) for p in layer.mlp.experts.parameters()}
    assert experts and not experts & {id(t) for t in mlp}
    assert mlp  # the router and the norm still are


@pytest.mark.parametrize("mode", prefetch.MODES)
def test_the_kernel_compiles_to_the_prefetch_instructions_for_hopper(mode):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lines = prefetch.CHUNK[mode] // prefetch.LINE if mode == "lines" else 0
    signature = {
        "addr_ptr": "*i64",
        "size_ptr": "*i32",
        "n": "i32",
        "BLOCK": "constexpr",
        "LINES": "constexpr",
    }
    source = ASTSource(prefetch._prefetch_kernel, signature, {"BLOCK": prefetch.THREADS, "LINES": lines})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
    if mode == "bulk":
        assert ptx.count("cp.async.bulk.prefetch.L2.global") == 1
    else:
        assert ptx.count("prefetch.global.L2") == lines
