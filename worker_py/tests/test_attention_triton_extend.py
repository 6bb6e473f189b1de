"""The Triton paged extend attention against a plain float64 reference: Triton's interpreter on the CPU (in a
subprocess, since the interpreter is chosen when kernels are defined), and the compiled kernel, inside a CUDA
graph as well, on a GPU when there is one.

Every cache slot that no request's length covers holds NaN, so a kernel that lets a key past a request's
length into its sum returns NaN rather than a value within tolerance. A key past a row's own position (a
later new token of its request) holds a real value: the causal mask is checked by the reference, a wrong
mask moving the output by about |v| / length, far above the tolerance. Padding rows of q (past the last
request's tokens) must come back as they went in.

Tolerances as in test_attention_triton_decode.py: float32 to about 1e-6 of the float64 reference, 2e-5
allowed; bf16 rounds the softmax weights and the output, 2e-2.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_check import run_kernel_check

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from minisgl.kernels import extend_attention as te

    DEVICE = "{device}"
    TOL = {{torch.float32: 2e-5, torch.bfloat16: 2e-2}}
    # (cached prefix, new tokens) per request: prompts whole and after a cached prefix, one-token decodes
    # (a mixed step), requests that end mid-block and on block and page boundaries, and one with nothing new.
    MIX = [(0, 37), (5, 1), (31, 16), (0, 1), (17, 70), (100, 3), (16, 16), (9, 0), (0, 130)]


    def make_batch(reqs, hq, hkv, d, dtype, seed, page=16, pad_tokens=0, pad_reqs=0):
        # Pages come out of a shuffled pool (so out of order), and every other request shares its first page
        # with request 0 at a random position of its own table (what the prefix cache does to page tables).
        g = torch.Generator().manual_seed(seed)
        lens = [p + t for p, t in reqs]
        n_pages = [(length + page - 1) // page for length in lens]
        pool = torch.randperm(sum(n_pages) + 5, generator=g)
        tables, used = [], 0
        for r, count in enumerate(n_pages):
            table = pool[used : used + count].clone()
            used += count
            if r % 2 and count > 1 and len(tables[0]):
                table[torch.randint(count, (1,), generator=g).item()] = tables[0][0]
            tables.append(table)
        k = torch.full((len(pool), page, hkv, d), float("nan"), dtype=dtype)
        v = torch.full_like(k, float("nan"))
        locs = [
            table[torch.arange(n) // page] * page + torch.arange(n) % page for table, n in zip(tables, lens)
        ]
        valid = torch.cat(locs).unique()
        k.view(-1, hkv, d)[valid] = torch.randn(len(valid), hkv, d, generator=g).to(dtype)
        v.view(-1, hkv, d)[valid] = torch.randn(len(valid), hkv, d, generator=g).clamp(-3.9, 3.9).to(dtype)
        new = [t for _, t in reqs]
        t = sum(new) + pad_tokens
        # q is a slice of a fused projection output, as the model hands it over: rows are not contiguous.
        qkv = torch.randn(t, hq + 2 * hkv, d, generator=g).to(dtype)
        # Padding requests have no tokens and no pages, as a padded step's do.
        qo = torch.tensor([0] + new + [0] * pad_reqs).cumsum(0).to(torch.int32)
        kv = torch.tensor([0] + n_pages + [0] * pad_reqs).cumsum(0).to(torch.int32)
        batch = dict(
            q=qkv[:, :hq], k_cache=k, v_cache=v, qo_indptr=qo, kv_indptr=kv,
            kv_indices=torch.cat(tables).to(torch.int32),
            seq_len=torch.tensor(lens + [0] * pad_reqs, dtype=torch.int32),
        )
        return {{name: x.to(DEVICE) for name, x in batch.items()}}, (reqs, locs)


    def reference(batch, layout):
        reqs, locs = layout
        q, k, v = batch["q"], batch["k_cache"], batch["v_cache"]
        hq, d = q.shape[1:]
        hkv = k.shape[2]
        out, row = [], 0
        for (prefix, new), loc in zip(reqs, locs):
            kk = k.view(-1, hkv, d)[loc.to(k.device)].double().repeat_interleave(hq // hkv, dim=1)
            vv = v.view(-1, hkv, d)[loc.to(v.device)].double().repeat_interleave(hq // hkv, dim=1)
            scores = torch.einsum("thd,lhd->htl", q[row : row + new].double(), kk) * d**-0.5
            pos = prefix + torch.arange(new, device=q.device)
            later = torch.arange(prefix + new, device=q.device)[None, :] > pos[:, None]
            scores = scores.masked_fill(later, float("-inf"))
            out.append(torch.einsum("htl,lhd->thd", scores.softmax(-1), vv))
            row += new
        return torch.cat(out)


    def check(got, want, dtype, what):
        assert got.dtype == dtype, (what, got.dtype)
        err = (got[: len(want)].double() - want).abs().max().item()
        assert err <= TOL[dtype], (what, err)


    def case_heads(hq, hkv, dtype, reqs=MIX, page=16, seed=0, **tiles):
        batch, layout = make_batch(reqs, hq, hkv, 64, dtype, seed, page=page)
        check(te.extend_attention(**batch, **tiles), reference(batch, layout), dtype, (hq, hkv, page, tiles))


    def case_padded(dtype, **options):
        # Padding tokens after the last request's and padding requests of no tokens: the grid's spare blocks
        # write nothing, so the padding rows keep what they held.
        batch, layout = make_batch(MIX, 14, 2, 64, dtype, seed=1, pad_tokens=45, pad_reqs=6)
        out = torch.full_like(batch["q"], 7.0)
        got = te.extend_attention(**batch, out=out, **options)
        assert got is out
        real = sum(t for _, t in MIX)
        assert out[real:].eq(7.0).all().item()
        check(got, reference(batch, layout), dtype, "padded")


    def case_no_alloc():
        batch, layout = make_batch([(3, 20), (0, 5)], 14, 2, 64, torch.float32, seed=2)
        out = torch.empty_like(batch["q"])
        saved = {{name: getattr(te.torch, name) for name in ALLOCATORS}}

        def refuse(*args, **kwargs):
            raise AssertionError("extend_attention allocated with its output given")

        for name in ALLOCATORS:
            setattr(te.torch, name, refuse)
        try:
            got = te.extend_attention(**batch, out=out)
        finally:
            for name, fn in saved.items():
                setattr(te.torch, name, fn)
        assert got is out
        check(got, reference(batch, layout), torch.float32, "no alloc")


    ALLOCATORS = ["empty", "zeros", "full", "empty_like", "zeros_like", "full_like", "empty_strided"]


    def case_graph(num_splits=1):
        # Capture one call at 256 tokens and 8 requests, then change the step in place and replay: the
        # captured grid must serve a step of other requests, lengths and block counts (and key shares).
        hq, hkv, d, t, n, dtype = 14, 2, 64, 256, 8, torch.bfloat16
        first, _ = make_batch([(0, 200), (40, 30)], hq, hkv, d, dtype, seed=3, pad_tokens=26, pad_reqs=6)
        real = sum(new for _, new in MIX[:-1])
        second, layout = make_batch(MIX[:-1], hq, hkv, d, dtype, seed=4, pad_tokens=t - real)
        bufs = {{name: x.clone() for name, x in first.items()}}
        bufs["kv_indices"] = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        bufs["kv_indices"][: len(first["kv_indices"])] = first["kv_indices"]
        bufs["k_cache"] = torch.zeros(64, 16, hkv, d, dtype=dtype, device=DEVICE)
        bufs["v_cache"] = torch.zeros_like(bufs["k_cache"])
        out = torch.empty(t, hq, d, dtype=dtype, device=DEVICE)
        call = lambda: te.extend_attention(**bufs, out=out, num_splits=num_splits)
        call()  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for name in ("q", "qo_indptr", "kv_indptr", "seq_len"):
            bufs[name].copy_(second[name])
        bufs["kv_indices"][: len(second["kv_indices"])] = second["kv_indices"]
        pages = second["k_cache"].shape[0]
        bufs["k_cache"][:pages] = second["k_cache"]
        bufs["v_cache"][:pages] = second["v_cache"]
        for turn in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check(out, reference(second, layout), dtype, ("graph", turn))


    CASES = {{
        "group7": lambda: [case_heads(14, 2, dt) for dt in (torch.float32, torch.bfloat16)],
        "group1": lambda: case_heads(4, 4, torch.float32),
        "group4": lambda: case_heads(8, 2, torch.float32, page=4),
        # Small tiles: many blocks a request, keys in several blocks of 16, pages of one token.
        "small_tiles": lambda: case_heads(14, 2, torch.float32, page=1, tile_rows=16, block_n=16),
        # Keys shared among programs: shares of one block of 16 keys to several, some holding no key a row
        # sees (its maximum stays -inf), then combined.
        "splits": lambda: [
            case_heads(14, 2, dt, block_n=16, num_splits=s)
            for dt in (torch.float32, torch.bfloat16)
            for s in (2, 3)
        ],
        "splits_padded": lambda: case_padded(torch.float32, num_splits=4),
        "padded": lambda: [case_padded(dt) for dt in (torch.float32, torch.bfloat16)],
        "no_alloc": case_no_alloc,
        "graph": case_graph,
        "graph_splits": lambda: case_graph(te.splits_for(256, 14, 2, 132)),
    }}
    CASES["{case}"]()
    print("ok")
    """
)

CPU_CASES = ["group7", "group1", "group4", "small_tiles", "splits", "splits_padded", "padded", "no_alloc"]


def run_check(case: str, device: str, interpret: bool) -> None:
    run_kernel_check(CHECK.format(device=device, case=case), interpret)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below run the real kernel")
@pytest.mark.parametrize("case", CPU_CASES)
def test_extend_attention_matches_the_reference_interpreted(case):
    # Only without a GPU, as the decode kernel's: the GPU image's Triton interpreter is another version.
    run_check(case, "cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [*CPU_CASES, "graph", "graph_splits"])
def test_extend_attention_matches_the_reference_compiled(case):
    run_check(case, "cuda", interpret=False)


def test_split_counts_follow_the_programs_a_token_count_fills():
    """Shares until a single prompt's blocks give about two programs an SM, at most MAX_SPLITS; none once
    its blocks fill the GPU (Qwen2.5's 14/2 heads: 16 tokens a block, on 132 SMs)."""
    from minisgl.kernels.extend_attention import MAX_SPLITS, splits_for

    counts = {t: splits_for(t, 14, 2, 132) for t in (1, 256, 512, 1024, 2048, 4096, 8192)}
    assert counts == {1: MAX_SPLITS, 256: 4, 512: 4, 1024: 3, 2048: 2, 4096: 1, 8192: 1}
    assert splits_for(1024, 14, 2, 66) < counts[1024]  # fewer SMs, fewer shares
    # No grouped heads: 128 tokens a block, so 8 blocks x 8 KV heads at 1024 tokens, 32 x 8 at 4096.
    assert (splits_for(1024, 8, 8, 132), splits_for(4096, 8, 8, 132)) == (4, 2)
