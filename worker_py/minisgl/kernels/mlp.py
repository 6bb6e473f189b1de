"""The MLP half of a decoder layer at a few rows in one launch: the residual add and RMSNorm, gate/up with
SiLU-and-mul, down (Triton, CUDA only).

At batch 1 to 16 each of those is a launch of its own that costs 2 to 4 us beyond the bytes it reads
(docs/benchmarks.md), and the three read 26 MB between them on Qwen2.5-0.5B. Here one launch of one program
per SM runs them as phases, each program taking its share of every phase, with a grid barrier
(`grid_barrier.py`) where a phase needs the whole result of the one before: the norm needs nothing, gate/up
needs every normalised row, down needs every column of the activation. Phase by phase the arithmetic is
`small_m`'s (the same tiles through `tl.dot`, rounded where eager bf16 torch rounds), so the model computes
the same numbers as through the separate kernels, except down, which sums its whole K in one program rather
than in split-K partials.

Under Triton's interpreter (the CPU tests) programs run one after another and a barrier would never open:
`phased=True` launches the phases one by one instead, which the GPU test also uses as the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minisgl.kernels import grid_barrier, pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl

MAX_ROWS = 16  # tl.dot's smallest tile, as in small_m


class Tiles(NamedTuple):
    gate_up_n: int = 32  # gate/up columns per task (and as many of up beside them)
    gate_up_k: int = 128
    down_n: int = 16  # output columns per down task; its whole K in one program
    down_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_TILES = Tiles()

NORM, GATE_UP, DOWN = 0, 1, 2
ALL = -1  # every phase, barriers between


def mlp(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    tiles: Tiles | None = None,
    programs: int | None = None,
    phased: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down(silu(gate(h)) * up(h)), x + residual) with h = RMSNorm(x + residual) (x alone if residual is
    None), or h = x when norm_weight is None (the norm already done). x [m <= 16, H]; gate_up [2I, H] holds
    [gate; up]; down [H, I]."""
    m, hidden = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"the MLP kernel takes at most {MAX_ROWS} rows, got {m}")
    inter = down.shape[1]
    if gate_up.shape != (2 * inter, hidden) or down.shape != (hidden, inter):
        raise ValueError(f"gate/up {tuple(gate_up.shape)} and down {tuple(down.shape)} for hidden {hidden}")
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else x
    if m == 0:
        return out, new_residual
    normed = torch.empty_like(x) if norm_weight is not None else x
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    if programs is None:
        programs = grid_barrier.max_programs(x.device) if x.is_cuda else 4
    sync = grid_barrier.state(x.device)
    phases = [p for p in (NORM, GATE_UP, DOWN) if p != NORM or norm_weight is not None]
    t = tiles or DEFAULT_TILES
    for phase in phases if phased else [ALL]:
        _mlp_kernel[(programs,)](
            x,
            residual if residual is not None else x,
            new_residual,
            norm_weight if norm_weight is not None else x,
            normed,
            gate_up,
            act,
            down,
            out,
            sync,
            eps,
            m,
            PHASE=phase,
            NORM=norm_weight is not None,
            HAS_RES=residual is not None,
            HIDDEN=hidden,
            INTER=inter,
            BLOCK_H=triton.next_power_of_2(hidden),
            GU_N=t.gate_up_n,
            GU_K=t.gate_up_k,
            D_N=t.down_n,
            D_K=t.down_k,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
            **pdl.launch_args(x),
        )
    return out, new_residual


if triton is not None:
    from minisgl.kernels.grid_barrier import grid_barrier as _barrier
    from minisgl.kernels.pdl import wait_previous
    from minisgl.kernels.rounding import round_to

    @triton.jit
    def _mlp_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        norm_w_ptr,
        h_ptr,
        gu_ptr,
        act_ptr,
        down_ptr,
        out_ptr,
        sync_ptr,
        eps,
        M,
        PHASE: tl.constexpr,
        NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        HIDDEN: tl.constexpr,
        INTER: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GU_N: tl.constexpr,
        GU_K: tl.constexpr,
        D_N: tl.constexpr,
        D_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        dt = out_ptr.dtype.element_ty
        rows = tl.arange(0, 16)
        row_ok = rows < M
        wait_previous(PDL)

        if NORM and (PHASE == -1 or PHASE == 0):
            # What norm.add_rms_norm does, a row per program.
            h_cols = tl.arange(0, BLOCK_H)
            h_ok = h_cols < HIDDEN
            for r in range(pid, M, programs):
                xr = tl.load(x_ptr + r * HIDDEN + h_cols, mask=h_ok, other=0.0).to(tl.float32)
                if HAS_RES:
                    xr = round_to(
                        xr + tl.load(res_ptr + r * HIDDEN + h_cols, mask=h_ok, other=0.0).to(tl.float32), dt
                    )
                    tl.store(res_out_ptr + r * HIDDEN + h_cols, xr.to(dt), mask=h_ok)
                rstd = tl.rsqrt(tl.sum(xr * xr, axis=0) / HIDDEN + eps)
                w_norm = tl.load(norm_w_ptr + h_cols, mask=h_ok, other=0.0).to(tl.float32)
                tl.store(h_ptr + r * HIDDEN + h_cols, (round_to(xr * rstd, dt) * w_norm).to(dt), mask=h_ok)
            if PHASE == -1:
                _barrier(sync_ptr, programs)

        if PHASE == -1 or PHASE == 1:
            # silu(gate) * up for GU_N columns of each: small_m's SILU tile, K = HIDDEN whole.
            for task in range(pid, tl.cdiv(INTER, GU_N), programs):
                g_cols = task * GU_N + tl.arange(0, GU_N)
                g_ok = g_cols < INTER
                gate_rows = gu_ptr + g_cols.to(tl.int64)[:, None] * HIDDEN
                up_rows = gate_rows + INTER * HIDDEN
                acc_gate = tl.zeros([GU_N, 16], dtype=tl.float32)
                acc_up = tl.zeros([GU_N, 16], dtype=tl.float32)
                for g_k0 in range(0, HIDDEN, GU_K):
                    g_ks = g_k0 + tl.arange(0, GU_K)
                    g_k_ok = g_ks < HIDDEN
                    g_mask = g_ok[:, None] & g_k_ok[None, :]
                    # Weights are read once a step: keep them out of the L2 the activations live in.
                    wg = tl.load(
                        gate_rows + g_ks[None, :], mask=g_mask, other=0.0, eviction_policy="evict_first"
                    )
                    wu = tl.load(
                        up_rows + g_ks[None, :], mask=g_mask, other=0.0, eviction_policy="evict_first"
                    )
                    xt = tl.load(
                        h_ptr + rows[None, :] * HIDDEN + g_ks[:, None],
                        mask=row_ok[None, :] & g_k_ok[:, None],
                        other=0.0,
                        cache_modifier=".cg",  # written by other programs of this launch
                    )
                    acc_gate += tl.dot(wg, xt)
                    acc_up += tl.dot(wu, xt)
                gate = round_to(acc_gate, dt)
                a = round_to(gate / (1.0 + tl.exp(-gate)), dt) * round_to(acc_up, dt)
                tl.store(
                    act_ptr + rows[None, :] * INTER + g_cols[:, None],
                    a.to(dt),
                    mask=row_ok[None, :] & g_ok[:, None],
                )
            if PHASE == -1:
                _barrier(sync_ptr, programs)

        if PHASE == -1 or PHASE == 2:
            for d_task in range(pid, tl.cdiv(HIDDEN, D_N), programs):
                d_cols = d_task * D_N + tl.arange(0, D_N)
                d_ok = d_cols < HIDDEN
                w_rows = down_ptr + d_cols.to(tl.int64)[:, None] * INTER
                acc_down = tl.zeros([D_N, 16], dtype=tl.float32)
                for d_k0 in range(0, INTER, D_K):
                    d_ks = d_k0 + tl.arange(0, D_K)
                    d_k_ok = d_ks < INTER
                    wd = tl.load(
                        w_rows + d_ks[None, :],
                        mask=d_ok[:, None] & d_k_ok[None, :],
                        other=0.0,
                        eviction_policy="evict_first",
                    )
                    at = tl.load(
                        act_ptr + rows[None, :] * INTER + d_ks[:, None],
                        mask=row_ok[None, :] & d_k_ok[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    acc_down += tl.dot(wd, at)
                tl.store(
                    out_ptr + rows[None, :] * HIDDEN + d_cols[:, None],
                    acc_down.to(dt),
                    mask=row_ok[None, :] & d_ok[:, None],
                )
