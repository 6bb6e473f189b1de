"""Every kernel of the decode path besides small_m (test_small_m_compiles.py has it) compiles for Hopper
(sm_90) offline, without a GPU, and waits for the kernel before it (`griddepcontrol.wait`) exactly when it is
launched with programmatic dependent launch (kernels/pdl.py): a kernel launched early that did not wait would
read its input before it is written."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minisgl.kernels import activation, embed, norm, rope  # noqa: E402
from minisgl.kernels import decode_attention as attention  # noqa: E402
from minisgl.kernels import extend_attention as extend  # noqa: E402

SHARES = {"share_acc_ptr": "*fp32", "share_max_ptr": "*fp32", "share_sum_ptr": "*fp32"}
EXTEND_TYPES = {"scale": "fp32", "qo_indptr_ptr": "*i32", "kv_indptr_ptr": "*i32", "indices_ptr": "*i32"}
EXTEND_TYPES |= {"seq_len_ptr": "*i32"} | SHARES
EXTEND_CONSTS = dict(
    N_PAD=256, GROUP=7, GROUP_PAD=8, BLOCK_M=16, D=64, PAGE_SIZE=16, BLOCK_N=64, IEEE_DOT=False
)

# kernel -> (argument types, constexprs), as Qwen2.5-0.5B's decode step launches it; an argument not named
# is an int32.
KERNELS = {
    "norm": (
        norm._rms_norm_kernel,
        {"eps": "fp32", "x_ptr": "*bf16", "res_ptr": "*bf16", "res_out_ptr": "*bf16", "w_ptr": "*bf16"},
        {"HAS_RES": True, "BLOCK": 1024},
    ),
    "silu_and_mul": (activation._silu_and_mul_kernel, {"x_ptr": "*bf16"}, {"BLOCK": 1024}),
    "resolve, record, embed": (
        embed._resolve_record_embed_kernel,
        {"ids_ptr": "*i32", "last_ptr": "*i32", "record_ptr": "*i32", "loc_ptr": "*i32"},
        {"BLOCK": 1024},
    ),
    "rope_store": (
        rope._rope_store_kernel,
        {"eps": "fp32", "pos_ptr": "*i32", "loc_ptr": "*i32"},
        {"NQ": 14, "NKV": 2, "D": 64, "HEADS": 16, "QK_NORM": False},
    ),
    "attention split": (
        attention._split_kernel,
        {"scale": "fp32", "indptr_ptr": "*i32", "indices_ptr": "*i32", "seq_len_ptr": "*i32"},
        dict(S_PAD=8, HQ=14, HKV=2, GROUP=7, GROUP_PAD=16, D=64, PAGE_SIZE=16, BLOCK_N=64, FUSED=False)
        | dict(IEEE_DOT=False),
    ),
    "attention combine": (
        attention._combine_kernel,
        {"seq_len_ptr": "*i32"},
        {"HQ": 14, "S_PAD": 8, "D": 64, "BLOCK_N": 64},
    ),
    # Not launched early (the extend graphs are larger than pdl.MAX_ROWS), but it compiles for Hopper here.
    "extend attention": (extend._extend_kernel, EXTEND_TYPES, EXTEND_CONSTS | {"SPLITS": 1}),
    "extend attention, keys in shares": (extend._extend_kernel, EXTEND_TYPES, EXTEND_CONSTS | {"SPLITS": 4}),
    "extend attention's combine": (
        extend._combine_kernel,
        SHARES | {"qo_indptr_ptr": "*i32"},
        dict(HQ=14, HQ_PAD=16, D=64, SPLITS=4),
    ),
}


def compile_for_hopper(kernel, types: dict, constexprs: dict) -> str:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.startswith("part"):
            signature[name] = "*fp32"
        else:
            signature[name] = "*bf16" if name.endswith("_ptr") else "i32"
    source = ASTSource(kernel, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("name", KERNELS)
def test_a_kernel_launched_early_waits_for_the_one_before(name, pdl):
    kernel, types, constexprs = KERNELS[name]
    ptx = compile_for_hopper(kernel, types, constexprs | {"PDL": pdl})
    assert ptx.count("griddepcontrol.wait") == int(pdl)
    assert ptx.count("griddepcontrol.launch_dependents") == int(pdl)


# Kernels that read something no kernel writes (the step's upload, weights and tables) before their wait.
READS_EARLY = ["resolve, record, embed", "norm", "rope_store", "attention split", "attention combine"]


@pytest.mark.parametrize("name", READS_EARLY)
def test_what_no_kernel_writes_is_read_before_the_wait(name):
    """Those loads come before the wait, where they overlap the kernel before, and the kernel's input (the
    residual, q/k/v, the splits' results) after it."""
    kernel, types, constexprs = KERNELS[name]
    ptx = compile_for_hopper(kernel, types, constexprs | {"PDL": True})
    wait = ptx.index("griddepcontrol.wait")
    assert "ld.global" in ptx[:wait]
    assert "ld.global" in ptx[wait:]


def test_only_launches_inside_launched_early_ask_for_pdl():
    import torch

    from minisgl.kernels import pdl

    assert not pdl.switch.on
    with pdl.launched_early(True):
        assert pdl.switch.on
        with pdl.launched_early(False):
            assert not pdl.switch.on
        assert pdl.switch.on
        assert pdl.launch_args(torch.zeros(1)) == {"PDL": False}  # never on the CPU
    assert not pdl.switch.on
