#!/usr/bin/env python3
"""The host time of the worker's `launch()` on the CPU, with every graph replay stubbed out: what Python costs
a step before and around its replay, whatever the GPU. Issue 12: a small prefill's result waits for the host
work before its replay, and a decode step's host path must stay well under its GPU time.

Cases (the runner of a tiny Qwen2 on the CPU, graphs stubbed at their replays, page size 16):
- `decode B`: `launch()` of a decode step of B requests of 33 tokens, whole (the replays return at once);
- `prefill RxT`: `launch()` of R prompts of T tokens, up to the token-row graph's replay (the host time that
  delays the step's first kernel).

    python scripts/bench_host_path.py [--trees . /path/to/other/checkout] [--rounds 3]

With several trees, each round runs every tree in its own process, one after another, so that the trees are
compared in one run; the table gives each case's median over rounds of the per-round medians, in us.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE, NUM_PAGES, MAX_BATCH, MAX_TOKENS = 16, 4096, 16, 512
CASES = ("decode 1", "decode 12", "decode 16", "prefill 1x32", "prefill 16x32")


class _Replayed(Exception):
    """Raised by a stubbed replay that ends the timed part of `launch()`."""


def measure(tree: Path, reps: int) -> dict[str, float]:
    """Median us of each case, in this process, importing the worker from `tree`."""
    # The worker from `tree`; the test helpers that build the runner from this checkout.
    sys.path[:0] = [str(tree / "worker_py"), str(ROOT / "worker_py" / "tests")]
    import torch
    from fake_steps import Join, StepBuilder
    from test_token_rows import EagerGraphs, with_eager_graphs
    from tiny_qwen import make_tiny_qwen

    torch.set_num_threads(1)
    logits = torch.zeros(MAX_BATCH, 512)
    sampled = torch.zeros(MAX_BATCH, dtype=torch.int32)
    replayed: list[float] = []

    class StubGraphs(EagerGraphs):
        """Replays that cost nothing: a decode graph returns zero logits and samples zeros; a token-row
        graph notes the time and ends the launch."""

        def replay(self, batch, rows):
            return logits[:rows]

        def replay_sampling(self, rows, mode):
            return sampled[:rows]

        def replay_hidden(self, batch, rows):
            replayed.append(time.perf_counter())
            raise _Replayed

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_qwen(Path(tmp), seed=3)
        r = with_eager_graphs(
            model,
            num_pages=NUM_PAGES,
            page_size=PAGE_SIZE,
            max_batch=MAX_BATCH,
            max_tokens=MAX_TOKENS,
            graphs=StubGraphs,
        )

    def timed(step, to_replay: bool) -> float:
        r._handles = [None] * len(r._handles)  # nothing is collected: the replays queued nothing
        start = time.perf_counter()
        try:
            r.launch(step)
        except _Replayed:
            r.uploader.finish()
        return (replayed[-1] if to_replay else time.perf_counter()) - start

    out = {}
    for case in CASES:
        kind, shape = case.split()
        b = StepBuilder(NUM_PAGES - 1, PAGE_SIZE, seed=0)  # the last page is the scratch page
        if kind == "decode":
            batch = int(shape)
            b.extend([(s, list(range(100, 133))) for s in range(batch)])
            step = b.decode(list(range(batch)))
        else:
            reqs, tokens = map(int, shape.split("x"))
            step = b.extend(
                [(s, list(range(100, 100 + tokens))) for s in range(reqs)], [Join(s) for s in range(reqs)]
            )
        for _ in range(reps // 10):
            timed(step, kind == "prefill")
        out[case] = 1e6 * statistics.median(timed(step, kind == "prefill") for _ in range(reps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1000, help="launches timed per case and round")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one tree, in this process
    args = ap.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure.resolve(), args.reps)))
        return 0
    rounds: dict[Path, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for i in range(args.rounds):
        for tree in args.trees:
            cmd = [sys.executable, __file__, "--measure", str(tree), "--reps", str(args.reps)]
            got = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rounds[tree].append(json.loads(got.splitlines()[-1]))
            print(f"round {i + 1}: {tree}", file=sys.stderr)
    print("| case | " + " | ".join(str(t) for t in args.trees) + " |")
    print("|---|" + "---|" * len(args.trees))
    for case in CASES:
        cells = [statistics.median(r[case] for r in rounds[tree]) for tree in args.trees]
        print(f"| {case} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
