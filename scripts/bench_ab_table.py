"""The table of scripts/bench_ab_gpu.sh, from the ab_{new,base}.N.json files it writes (`minisgl bench offline
--out`): `python3 scripts/bench_ab_table.py FILE...`. One row per workload, one column per engine and round in
the order they ran; each workload's figure is the one docs/benchmarks.md quotes (tok/s, or ms a step for
decodeB, ms a token for `single`, ms from the first send to the last final for prefillB). Standard library
only; a run that is missing shows as "-".

Given the runs' logs too (ab_{new,base}.N.log, with the scheduler's "step answered" trace), a second table
gives the commonest steps' time from publish to result: the median `in_flight_us` per (kind, requests, new
tokens)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"ab_(?P<engine>new|base)\.(?P<round>\d+)\.(?P<ext>json|log)$")
# A "step answered" line of the scheduler's trace, its ANSI colours stripped first.
ANSWERED = re.compile(r"kind=(\w+) requests=(\d+) tokens=(\d+) in_flight_us=(\d+)")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
STEP_ROWS = 6  # the commonest step shapes shown


def figure(run: dict) -> tuple[str, float | None]:
    """(unit, value) of one run of `minisgl bench offline`."""
    for key, unit in (
        ("step_ms", "ms a step"),
        ("ms_per_token", "ms a token"),
        ("prefill_ms", "ms a prefill"),
    ):
        if key in run:
            return unit, run[key]
    return "tok/s", run.get("output_tok_per_s")


def table(files: list[Path]) -> str:
    columns = []  # (engine, round, {workload: run})
    for path in files:
        m = NAME.search(path.name)
        if not m or m["ext"] != "json":
            continue
        runs = json.loads(path.read_text()).get("runs", [])
        columns.append((int(m["round"]), m["engine"] != "new", m["engine"], {r["workload"]: r for r in runs}))
    columns.sort(key=lambda c: c[:2])
    workloads = list(dict.fromkeys(w for *_, runs in columns for w in runs))
    head = "| workload | " + " | ".join(f"{engine} ({rnd})" for rnd, _, engine, _ in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for w in workloads:
        unit, cells = "", []
        for *_, runs in columns:
            if w not in runs:
                cells.append("-")
                continue
            unit, value = figure(runs[w])
            cells.append("-" if value is None else f"{value:,.0f}" if unit == "tok/s" else f"{value:.3f}")
        lines.append(f"| {w}, {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(files: list[Path]) -> str:
    """Median publish-to-result time of the commonest step shapes, one column per log; "" without logs."""
    columns = []  # (round, engine is base, engine, {(kind, requests, tokens): [us]})
    for path in files:
        m = NAME.search(path.name)
        if not m or m["ext"] != "log":
            continue
        steps: dict[tuple[str, int, int], list[int]] = {}
        for line in path.read_text(errors="replace").splitlines():
            found = ANSWERED.search(COLOUR.sub("", line))
            if found:
                kind, reqs, tokens, us = found.groups()
                steps.setdefault((kind, int(reqs), int(tokens)), []).append(int(us))
        columns.append((int(m["round"]), m["engine"] != "new", m["engine"], steps))
    if not columns:
        return ""
    columns.sort(key=lambda c: c[:2])
    counts: dict[tuple[str, int, int], int] = {}
    for *_, steps in columns:
        for key, times in steps.items():
            counts[key] = counts.get(key, 0) + len(times)
    shapes = sorted(counts, key=lambda k: -counts[k])[:STEP_ROWS]
    head = "| step: kind, requests x tokens | " + " | ".join(f"{e} ({r})" for r, _, e, _ in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for kind, reqs, tokens in sorted(shapes):
        cells = []
        for *_, steps in columns:
            times = sorted(steps.get((kind, reqs, tokens), []))
            cells.append(f"{times[len(times) // 2] / 1e3:.3f} ms ({len(times)})" if times else "-")
        lines.append(
            f"| {kind}, {reqs} x {tokens // max(reqs, 1)}, publish to result | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [Path(a) for a in sys.argv[1:]]
    print(table(paths))
    steps = step_table(paths)
    if steps:
        print("\n" + steps)
