"""The Triton paged decode attention against a plain float64 reference: Triton's interpreter on the CPU (in a
subprocess, since the interpreter is chosen when kernels are defined), and the compiled kernels, inside a
CUDA graph as well, on a GPU when there is one.

Every cache slot that no request's length covers holds NaN, so a kernel that lets a token past a request's
length into its sum returns NaN rather than a value within tolerance.

Tolerances: float32 agrees with the float64 reference to about 1e-6 (sums of at most 300 terms of size 1);
2e-5 is well below the smallest change a wrong mask makes (one token of 300 moves the output by about
|v| / 300, 3e-3). bf16 rounds the output (half an ulp is 0.008 below 4, and |v| < 4 here) and the softmax
weights before P @ V (each by 2^-9 relative, at most 0.008 on the sum), hence 2e-2; the float32 cases are
the sharp ones for the indexing.
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
    from minisgl.kernels import decode_attention as td

    DEVICE = "{device}"
    PAGE = 16
    MIX = [1, 15, 16, 17, 63, 64, 65, 300]
    TOL = {{torch.float32: 2e-5, torch.bfloat16: 2e-2}}


    def make_batch(lens, hq, hkv, d, dtype, seed):
        # Pages come out of a shuffled pool (so out of order), and every other request shares its first page
        # with request 0 (a common prefix) at a random position of its own table.
        g = torch.Generator().manual_seed(seed)
        n_pages = [(length + PAGE - 1) // PAGE for length in lens]
        pool = torch.randperm(sum(n_pages) + 5, generator=g)
        tables, used = [], 0
        for r, count in enumerate(n_pages):
            table = pool[used : used + count].clone()
            used += count
            if r % 2 and r > 0 and count > 1:
                table[torch.randint(count, (1,), generator=g).item()] = tables[0][0]
            tables.append(table)
        num_pages = len(pool)
        k = torch.full((num_pages, PAGE, hkv, d), float("nan"), dtype=dtype)
        v = torch.full_like(k, float("nan"))
        locs = [table[torch.arange(length) // PAGE] * PAGE + torch.arange(length) % PAGE
                for table, length in zip(tables, lens)]
        valid = torch.cat(locs).unique()
        k.view(-1, hkv, d)[valid] = torch.randn(len(valid), hkv, d, generator=g).to(dtype)
        v.view(-1, hkv, d)[valid] = torch.randn(len(valid), hkv, d, generator=g).clamp(-3.9, 3.9).to(dtype)
        # q is a slice of a fused projection output, as the model hands it over: rows are not contiguous.
        qkv = torch.randn(len(lens), hq + 2 * hkv, d, generator=g).to(dtype)
        indptr = torch.tensor([0] + n_pages).cumsum(0).to(torch.int32)
        batch = dict(
            q=qkv[:, :hq], k_cache=k, v_cache=v, kv_indptr=indptr,
            kv_indices=torch.cat(tables).to(torch.int32), seq_len=torch.tensor(lens, dtype=torch.int32),
        )
        return {{name: t.to(DEVICE) for name, t in batch.items()}}, locs


    def reference(batch, locs):
        q, k, v = batch["q"], batch["k_cache"], batch["v_cache"]
        hq, d = q.shape[1:]
        hkv = k.shape[2]
        out = []
        for r, loc in enumerate(locs):
            kk = k.view(-1, hkv, d)[loc.to(k.device)].double().repeat_interleave(hq // hkv, dim=1)
            vv = v.view(-1, hkv, d)[loc.to(v.device)].double().repeat_interleave(hq // hkv, dim=1)
            scores = torch.einsum("hd,lhd->hl", q[r].double(), kk) * d**-0.5
            out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), vv))
        return torch.stack(out)


    def check(got, want, dtype, what):
        assert got.dtype == dtype, (what, got.dtype)
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[dtype], (what, err)


    def case_heads(hq, hkv, dtype, splits, lens=MIX, seed=0, min_tokens=0):
        batch, locs = make_batch(lens, hq, hkv, 64, dtype, seed)
        want = reference(batch, locs)
        for s in splits:
            got = td.decode_attention(**batch, num_splits=s, min_split_tokens=min_tokens)
            check(got, want, dtype, (hq, hkv, s, min_tokens))


    def case_fused(dtype, splits):
        # Run twice on the same buffers with a new query the second time: a counter left non-zero by the first
        # run would make the second one skip its combine and leave `out` as it was (NaN here).
        batch, locs = make_batch(MIX, 14, 2, 64, dtype, seed=1)
        for s in splits:
            n = len(MIX)
            out = torch.empty_like(batch["q"])
            partial = td.alloc_partial(n, 14, 64, s, DEVICE)
            counters = td.alloc_counters(n, 2, DEVICE)
            for turn in range(2):
                batch["q"] = torch.randn_like(batch["q"])
                out.fill_(float("nan"))
                got = td.decode_attention(**batch, out=out, partial=partial, num_splits=s,
                                          fused_combine=True, counters=counters)
                check(got, reference(batch, locs), dtype, ("fused", s, turn))
                assert counters.eq(0).all().item(), counters.tolist()


    def case_no_alloc():
        batch, locs = make_batch([5, 40], 14, 2, 64, torch.float32, seed=2)
        out = torch.empty(2, 14, 64, device=DEVICE)
        partial = td.alloc_partial(2, 14, 64, 3, DEVICE)
        counters = td.alloc_counters(2, 2, DEVICE)

        def refuse(*args, **kwargs):
            raise AssertionError("decode_attention allocated with its buffers given")

        for fused in (False, True):
            saved = {{name: getattr(td.torch, name) for name in ALLOCATORS}}
            for name in ALLOCATORS:
                setattr(td.torch, name, refuse)
            try:
                got = td.decode_attention(**batch, out=out, partial=partial, num_splits=3,
                                          fused_combine=fused, counters=counters)
            finally:
                for name, fn in saved.items():
                    setattr(td.torch, name, fn)
            assert got is out
            check(got, reference(batch, locs), torch.float32, ("no alloc", fused))


    ALLOCATORS = ["empty", "zeros", "full", "empty_like", "zeros_like", "full_like", "empty_strided"]


    def case_graph(fused):
        # Capture one call, then change lengths, page tables and queries in place and replay: the captured
        # grid must serve the new step, including lengths it never saw and a request that got shorter.
        s, hq, hkv, d = 4, 14, 2, 64
        first, _ = make_batch([3, 200, 64], hq, hkv, d, torch.bfloat16, seed=3)
        second, locs = make_batch([300, 1, 129], hq, hkv, d, torch.bfloat16, seed=4)
        bufs = {{name: t.clone() for name, t in first.items()}}
        bufs["kv_indices"] = torch.zeros(64, dtype=torch.int32, device=DEVICE)
        bufs["kv_indices"][: len(first["kv_indices"])] = first["kv_indices"]
        bufs["k_cache"] = torch.zeros(64, PAGE, hkv, d, dtype=torch.bfloat16, device=DEVICE)
        bufs["v_cache"] = torch.zeros_like(bufs["k_cache"])
        out = torch.empty(3, hq, d, dtype=torch.bfloat16, device=DEVICE)
        partial = td.alloc_partial(3, hq, d, s, DEVICE)
        counters = td.alloc_counters(3, hkv, DEVICE)
        call = lambda: td.decode_attention(**bufs, out=out, partial=partial, num_splits=s,
                                           fused_combine=fused, counters=counters)
        call()  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        for name in ("q", "kv_indptr", "seq_len"):
            bufs[name].copy_(second[name])
        bufs["kv_indices"][: len(second["kv_indices"])] = second["kv_indices"]
        pages = second["k_cache"].shape[0]
        bufs["k_cache"][:pages] = second["k_cache"]
        bufs["v_cache"][:pages] = second["v_cache"]
        for turn in range(2):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check(out, reference(second, locs), torch.bfloat16, ("graph", fused, turn))


    CASES = {{
        "group7": lambda: [case_heads(14, 2, dt, (1, 3, 8)) for dt in (torch.float32, torch.bfloat16)],
        "group1": lambda: case_heads(4, 4, torch.float32, (1, 3, 8), lens=[1, 17, 65, 300]),
        "group4": lambda: [case_heads(8, 2, dt, (3,)) for dt in (torch.float32, torch.bfloat16)],
        # A smallest share (100 rounds up to 128): short requests in one split, the 300-token one in three.
        "min_share": lambda: case_heads(14, 2, torch.float32, (8,), min_tokens=100),
        "fused": lambda: [case_fused(dt, (1, 3, 8)) for dt in (torch.float32, torch.bfloat16)],
        "no_alloc": case_no_alloc,
        "graph": lambda: [case_graph(fused) for fused in (False, True)],
    }}
    CASES["{case}"]()
    print("ok")
    """
)

CPU_CASES = ["group7", "group1", "group4", "min_share", "fused", "no_alloc"]


def run_check(case: str, device: str, interpret: bool) -> None:
    run_kernel_check(CHECK.format(device=device, case=case), interpret)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests below run the real kernels")
@pytest.mark.parametrize("case", CPU_CASES)
def test_decode_attention_matches_the_reference_interpreted(case):
    # Only without a GPU: Triton's interpreter on the H200 image (3.6) is not the one pinned here (3.9), and
    # it has disagreed with its own compiled kernels before (test_sampling_fused.py).
    run_check(case, "cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", [*CPU_CASES, "graph"])
def test_decode_attention_matches_the_reference_on_the_gpu(case):
    run_check(case, "cuda", interpret=False)


def test_splits_for_fills_small_batches_and_cuts_long_contexts():
    from minisgl.kernels.decode_attention import MAX_SPLITS, splits_for

    assert splits_for(1, 64) == 1  # one block of tokens: nothing to share
    assert splits_for(1, 128) == 1  # --decode-graph-context 128: a graph with no split and no combine
    assert splits_for(256, 160) == 1  # 512 programs already fill 132 SMs
    assert splits_for(1, 2048) > splits_for(64, 2048) > 1
    assert splits_for(140, 2048) >= 4  # no share longer than 512 tokens
    assert splits_for(1, 1 << 20) == MAX_SPLITS


def test_split_plan_grows_the_smallest_share_with_the_batch():
    from minisgl.kernels.decode_attention import BLOCK_N, split_plan

    assert split_plan(1, 4096)[1] == BLOCK_N
    assert split_plan(64, 4096)[1] == BLOCK_N  # 128 programs: one wave on 132 SMs
    assert split_plan(256, 4096)[1] == 4 * BLOCK_N  # 512 programs: four waves
    assert split_plan(256, 4096, num_sms=512)[1] == BLOCK_N
