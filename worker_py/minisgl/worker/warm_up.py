"""Extend steps of every size class, run once before serving, so that the first requests do not pay for setup.

Measured on the H200 (scripts/bench_e2e.py, 2026-11-29): the seed workload's first two prefills, of 128 and
384 tokens, took 12.9 and 27 ms where a warm prefill of 8,192 tokens takes 16 ms. The likely causes: the
first use of a GEMM shape class loads its cuBLAS kernels (CUDA loads modules lazily), and the first
activations of a size grow the caching allocator through cudaMalloc. Graph capture covers the decode shapes;
nothing covered the prefill shapes.

The steps use the KV pages before the scheduler owns them (it hands out none before the handshake) and the
first request slots, whose sampling parameters and last token every real request overwrites when it joins.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np

log = logging.getLogger("minisgl.worker")

PROMPT_TOKENS = 32  # per request: the token count of each warm-up step is spread over requests this long


def warm_up(runner) -> float:
    """Runs one extend step of 32, 64, ... up to `runner.max_tokens` tokens; returns the seconds it took."""
    start = time.perf_counter()
    tokens, sizes = PROMPT_TOKENS, []
    while tokens <= runner.max_tokens:
        sizes.append(tokens)
        tokens *= 2
    ran = 0
    for total in sizes:
        reqs = min(total // PROMPT_TOKENS, runner.max_batch)
        step = extend_step(reqs, total // reqs, runner.page_size, runner.model_config.vocab_size)
        if int(step.kv_indices.max()) >= runner.num_pages:
            break  # a pool this small serves nothing of this size either
        runner.run_step(step)
        ran += 1
    seconds = time.perf_counter() - start
    log.info(
        "warmed up %d prefill sizes (up to %d tokens) in %.1f s", ran, sizes[ran - 1] if ran else 0, seconds
    )
    return seconds


def extend_step(reqs: int, length: int, page_size: int, vocab: int) -> SimpleNamespace:
    """`reqs` fresh prompts of `length` tokens in slots 0..reqs-1 over pages 0.., each joining with
    temperature 1 so that the sampling kernels run too."""
    pages = -(-length // page_size)
    i32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    slots = np.arange(reqs)
    page_of = slots[:, None] * pages + np.arange(length)[None, :] // page_size
    return SimpleNamespace(
        step_id=0,
        kind=0,
        req_slot=i32(slots),
        seq_len=i32(np.full(reqs, length)),
        qo_indptr=i32(np.arange(reqs + 1) * length),
        kv_indptr=i32(np.arange(reqs + 1) * pages),
        kv_last_page_len=i32(np.full(reqs, length - (pages - 1) * page_size)),
        input_ids=i32(np.arange(reqs * length) % vocab),
        positions=i32(np.tile(np.arange(length), reqs)),
        out_loc=i32((page_of * page_size + np.arange(length)[None, :] % page_size).ravel()),
        kv_indices=i32(np.arange(reqs * pages)),
        join_slot=i32(slots),
        join_temperature=np.ones(reqs, dtype=np.float32),
        join_top_p=np.ones(reqs, dtype=np.float32),
        join_top_k=i32(np.full(reqs, -1)),
        join_seed=np.arange(reqs, dtype=np.uint64),
    )
