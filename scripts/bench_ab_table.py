"""The table of scripts/bench_ab_gpu.sh, from the ab_{new,base}.N.json files it writes (`minisgl bench offline
--out`): `python3 scripts/bench_ab_table.py FILE...`. One row per workload, one column per engine and round in
the order they ran; each workload's figure is the one docs/benchmarks.md quotes (tok/s, or ms a step for
decodeB, ms a token for `single`, ms from the first send to the last final for prefillB). Standard library
only; a run that is missing shows as "-"."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

NAME = re.compile(r"ab_(?P<engine>new|base)\.(?P<round>\d+)\.json$")


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
        if not m:
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


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
