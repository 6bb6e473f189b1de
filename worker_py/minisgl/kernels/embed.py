"""A step's first kernel: each new token's id resolved, recorded beside its K/V, and embedded, in one launch.

Decode inputs name the token a slot sampled last as `-(slot + 1)`, so the host never waits for it; the model
needs the real id, the KV cache keeps it (`KVCache.token_ids`, read by the penalties), and the embedding
looks it up. As torch ops that was seven launches at the head of every graph (a compare, a negation, a
clamp, a gather, a `where`, an indexed store, the embedding), none of them launched early: in an H100
profile at batch 1 (docs/benchmarks.md, 2026-12-08) torch's small kernels took 19 us of the step. Here one
program per token does all three; launched early, it reads its id and KV location (the step's upload)
before it waits for the kernel before.
"""

from __future__ import annotations

import torch

from minisgl.kernels import pdl
from minisgl.kernels.rounding import triton

if triton is not None:
    import triton.language as tl


def resolve_and_record(
    ids: torch.Tensor, last_token: torch.Tensor, record: torch.Tensor, out_loc: torch.Tensor
) -> torch.Tensor:
    """ids [t] with each negative id -(s + 1) replaced by `last_token[s]`; also written to
    `record[out_loc]`."""
    ids = torch.where(ids >= 0, ids, last_token[(-1 - ids).clamp(min=0)])
    record[out_loc] = ids
    return ids


def resolve_record_embed_reference(
    ids: torch.Tensor,
    last_token: torch.Tensor,
    record: torch.Tensor,
    out_loc: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """`resolve_and_record`, then the embedding rows `weight[ids]`, [t, hidden]."""
    return torch.nn.functional.embedding(resolve_and_record(ids, last_token, record, out_loc), weight)


def resolve_record_embed(
    ids: torch.Tensor,
    last_token: torch.Tensor,
    record: torch.Tensor,
    out_loc: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """`resolve_record_embed_reference` in one kernel (CUDA, or Triton's interpreter). weight [V, hidden]
    contiguous; ids, last_token, record and out_loc int32."""
    t, hidden = ids.shape[0], weight.shape[1]
    out = torch.empty(t, hidden, dtype=weight.dtype, device=weight.device)
    if t:
        _resolve_record_embed_kernel[(t,)](
            ids,
            last_token,
            record,
            out_loc,
            weight,
            out,
            hidden,
            BLOCK=triton.next_power_of_2(hidden),
            **pdl.launch_args(ids),
        )
    return out


if triton is not None:
    from minisgl.kernels.pdl import wait_previous

    # The ids and locations are slices of the step's packed upload at any offset: no variant per alignment.
    @triton.jit(do_not_specialize=["ids_ptr", "loc_ptr"])
    def _resolve_record_embed_kernel(
        ids_ptr, last_ptr, record_ptr, loc_ptr, w_ptr, out_ptr, hidden, BLOCK: tl.constexpr, PDL: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        token = tl.load(ids_ptr + row)  # the upload's: no kernel writes them
        loc = tl.load(loc_ptr + row).to(tl.int64)
        wait_previous(PDL)  # the slots' last tokens come from the sampling before
        last = tl.load(last_ptr + tl.maximum(-1 - token, 0))
        token = tl.where(token >= 0, token, last)
        tl.store(record_ptr + loc, token)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(w_ptr + token.to(tl.int64) * hidden + cols, mask=mask)
        tl.store(out_ptr + row * hidden + cols, x, mask=mask)
