"""The step's first kernel (kernels/embed.py: resolve the -(slot+1) ids, record them beside the K/V, embed)
against its torch reference: by Triton's interpreter on the CPU (in a subprocess: the interpreter is chosen
when kernels are defined), and compiled on a GPU when there is one."""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_check import run_kernel_check

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from minisgl.kernels import embed

    device = "{device}"
    torch.manual_seed(0)
    vocab, hidden, slots, locs = 50, 40, 9, 64  # hidden not a power of two: the row is masked
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(vocab, hidden).to(dtype).to(device)
        last_token = torch.randint(0, vocab, (slots,), dtype=torch.int32, device=device)
        # Prompt ids, slots' last tokens (-(s + 1)), slot 0 and the last slot among them.
        ids = torch.tensor([3, -1, 49, -9, 0, -4, 7, -1], dtype=torch.int32, device=device)
        out_loc = torch.tensor([5, 60, 1, 33, 2, 8, 63, 0], dtype=torch.int32, device=device)
        want_record = torch.full((locs,), -7, dtype=torch.int32, device=device)
        got_record = want_record.clone()
        want = embed.resolve_record_embed_reference(ids, last_token, want_record, out_loc, weight)
        got = embed.resolve_record_embed(ids, last_token, got_record, out_loc, weight)
        assert torch.equal(got, want), (got - want).abs().max()
        assert torch.equal(got_record, want_record)
        assert got_record[60].item() == last_token[0].item() and got_record[33].item() == last_token[8].item()
        # An offset slice of a packed buffer, as the step's upload hands them over.
        packed = torch.cat([torch.zeros(3, dtype=torch.int32, device=device), ids])
        again = embed.resolve_record_embed(packed[3:], last_token, got_record, out_loc, weight)
        assert torch.equal(again, want)
        none = embed.resolve_record_embed(ids[:0], last_token, got_record, out_loc[:0], weight)
        assert none.shape == (0, hidden)
    print("ok")
    """
)


def test_the_kernel_resolves_records_and_embeds_as_the_reference_under_the_interpreter():
    run_kernel_check(CHECK.format(device="cpu"), interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_kernel_resolves_records_and_embeds_as_the_reference_on_the_gpu():
    run_kernel_check(CHECK.format(device="cuda"), interpret=False)
