"""small_m's kernel compiles for Hopper (sm_90) in every variant the model launches, and pipelines its weight
loads, on a machine without a GPU: Triton compiles offline for a named target with its bundled ptxas. The
interpreter (test_small_m_linear.py) checks the arithmetic but never compiles, and CI has no GPU."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minisgl.kernels import small_m  # noqa: E402

KERNEL = small_m._small_m_kernel
INTS = ("M", "N", "K", "stride_x", "k_per_split")
SWITCHES = ("HAS_BIAS", "PREFETCH", "SILU_MUL", "ROPE", "PDL")
OFF = dict.fromkeys(SWITCHES, False) | {"NQ": 0, "NKV": 0, "LINE": 64}
# name -> constexprs, as _launch sets them for Qwen2.5-0.5B's projections
VARIANTS = {
    "o": dict(OFF, SPLIT_K=1, BLOCK_N=16, BLOCK_K=256),
    "down, split-K": dict(OFF, SPLIT_K=8, BLOCK_N=64, BLOCK_K=256),
    "o, launched early (PDL)": dict(OFF, PDL=True, SPLIT_K=1, BLOCK_N=16, BLOCK_K=256),
    "gate/up with SiLU": dict(OFF, SILU_MUL=True, SPLIT_K=1, BLOCK_N=32, BLOCK_K=128),
    "q/k/v with RoPE, split-K, PDL": dict(
        OFF, HAS_BIAS=True, ROPE=True, NQ=14, NKV=2, PDL=True, SPLIT_K=4, BLOCK_N=32, BLOCK_K=256
    ),
    "gate/up with SiLU, prefetched, PDL": dict(
        OFF, SILU_MUL=True, PREFETCH=True, PDL=True, SPLIT_K=1, BLOCK_N=32, BLOCK_K=128
    ),
    "down, split-K, prefetched, PDL": dict(OFF, PREFETCH=True, PDL=True, SPLIT_K=8, BLOCK_N=64, BLOCK_K=256),
}


def compile_for_hopper(constexprs: dict, num_stages: int = 3):
    split = constexprs["SPLIT_K"] > 1
    signature, attrs = {}, {}
    for i, name in enumerate(KERNEL.arg_names):
        if name in ("pos_ptr", "loc_ptr"):
            signature[name] = "*i32"  # not specialised: slices of the step's buffer at any offset
        elif name == "part_ptr":
            signature[name] = "*fp32" if split else "*bf16"
        elif name == "count_ptr":
            signature[name] = "*i32" if split else "*bf16"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        elif name == "eps":
            signature[name] = "fp32"
        elif name in INTS:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
        # What the JIT sees at run time: torch's allocations and these shapes are multiples of 16.
        if (signature[name].startswith("*") and name not in ("pos_ptr", "loc_ptr")) or name in INTS[1:]:
            attrs[(i,)] = [["tt.divisibility", 16]]
    slot = constexprs["BLOCK_N"] * 16 * (2 if constexprs["SILU_MUL"] or constexprs["ROPE"] else 1)
    source = ASTSource(KERNEL, signature, dict(constexprs, SLOT=slot), attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": num_stages}
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_small_m_compiles_for_hopper_with_pipelined_weight_loads(variant):
    constexprs = VARIANTS[variant]
    ptx = compile_for_hopper(constexprs).asm["ptx"]
    assert "mma.sync" in ptx or "wgmma" in ptx  # wgmma where a strip is 64 columns
    # The weight tiles stream through asynchronous copies, several K tiles ahead: the kernel's whole point.
    assert ptx.count("cp.async") >= 8, variant
    # Launched with PDL, it waits for the kernel before it first (kernels/pdl.py); else it has no such wait.
    assert ("griddepcontrol.wait" in ptx) == VARIANTS[variant]["PDL"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if VARIANTS[v]["PREFETCH"]])
def test_a_prefetching_tile_asks_for_its_weights_before_it_waits(variant):
    """--prefetch-weights: the program's L2 prefetches of its weight tile come before the wait for the kernel
    before it (weights are written by no kernel), and without PREFETCH there are none."""
    ptx = compile_for_hopper(VARIANTS[variant]).asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert "prefetch.global.L2" in ptx[:wait]
    assert "prefetch.global.L2" not in ptx[wait:]
    plain = compile_for_hopper(dict(VARIANTS[variant], PREFETCH=False)).asm["ptx"]
    assert "prefetch.global.L2" not in plain
