"""`minisgl bench plot`: latency percentiles and throughput of `minisgl bench serve` runs, one line per
result file, against the offered request rate (or the concurrency, for concurrency sweeps); or, for the JSON
of `minisgl bench offline`, output tokens/s per workload, one bar per file and engine configuration.

A rate of inf (every request at once) is drawn one step to the right of the largest finite rate. With
`--x achieved` the x axis is the measured requests per second instead, which puts runs of any kind on one
axis.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DESCRIPTION = __doc__.split("\n\n")[0]

# (title, the run's key, its percentiles, log scale)
PANELS = (
    ("TTFT (ms)", "ttft_ms", ("p50", "p99"), True),
    ("TPOT (ms)", "tpot_ms", ("p50", "p99"), True),
    ("ITL (ms)", "itl_ms", ("p50", "p99"), True),
    ("output tokens/s", "output_tok_per_s", None, False),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="JSON results of `minisgl bench serve` or `offline`")
    p.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    p.add_argument(
        "--x",
        choices=("offered", "achieved"),
        default="offered",
        help="x axis: the offered load (request rate or concurrency), or the measured requests/s",
    )
    p.add_argument("--title", default=None)


def x_values(runs: list[dict], x: str, inf_at: float) -> tuple[list[float], str]:
    if x == "achieved":
        return [r["requests_per_s"] for r in runs], "achieved requests/s"
    if all(r.get("concurrency") is not None for r in runs):
        return [float(r["concurrency"]) for r in runs], "concurrency"
    return [inf_at if r["rate"] == "inf" else float(r["rate"]) for r in runs], "request rate (req/s)"


def plot_reports(reports: list[tuple[str, dict]], out: Path, x: str = "offered", title: str | None = None):
    """Draws `(label, report)` pairs into `out`. matplotlib is imported here, not with the package: only
    plotting needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    finite = [
        float(r["rate"])
        for _, rep in reports
        for r in rep["runs"]
        if r.get("rate") not in (None, "inf") and r.get("concurrency") is None
    ]
    inf_at = max(finite) * 2 if finite else 1.0
    kinds = {("c" if r.get("concurrency") is not None else "r") for _, rep in reports for r in rep["runs"]}
    if x == "offered" and len(kinds) > 1:
        x = "achieved"  # rates and concurrencies share no axis

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    xlabel = ""
    for n, (label, rep) in enumerate(reports):
        runs = [r for r in rep["runs"] if r.get("completed")]
        if not runs:
            continue
        xs, xlabel = x_values(runs, x, inf_at)
        order = sorted(range(len(runs)), key=lambda i: xs[i])
        xs, runs = [xs[i] for i in order], [runs[i] for i in order]
        color = f"C{n % 10}"
        for ax, (_, key, pcts, _) in zip(axes.flat, PANELS, strict=True):
            if pcts is None:
                ax.plot(xs, [r[key] for r in runs], "o-", color=color, label=label)
                continue
            for pct, style in zip(pcts, ("o-", "s--"), strict=True):
                ys = [math.nan if r[key][pct] is None else r[key][pct] for r in runs]
                ax.plot(xs, ys, style, color=color, label=f"{label} {pct}")
    for ax, (name, _, _, log) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if log:
            ax.set_yscale("log")
            # Plain numbers: an axis spanning less than a decade has labels on its minor ticks only.
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        if x == "offered":  # sweeps double the load from one run to the next
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
        if ax.lines:
            ax.legend(fontsize="small")
    if finite and x == "offered" and xlabel.startswith("request rate"):
        has_inf = any(r.get("rate") == "inf" for _, rep in reports for r in rep["runs"])
        for ax in axes.flat:
            ticks = sorted(set(finite))
            ax.set_xticks(ticks + [inf_at] * has_inf, [f"{t:g}" for t in ticks] + ["inf"] * has_inf)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    fig.suptitle(title or "minisgl bench serve")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_offline(reports: list[tuple[str, dict]], out: Path, title: str | None = None) -> None:
    """Output tokens/s of `(label, offline report)` pairs: a group of bars per workload, a bar per label and
    engine configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for _, rep in reports for r in rep["runs"]))
    bars = list(dict.fromkeys((label, r["engine"]) for label, rep in reports for r in rep["runs"]))
    speed = {
        (label, r["engine"], r["workload"]): r["output_tok_per_s"]
        for label, rep in reports
        for r in rep["runs"]
    }
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(2 + 2.5 * len(workloads), 4.5), constrained_layout=True)
    for n, (label, engine) in enumerate(bars):
        xs = [w + (n - (len(bars) - 1) / 2) * width for w in range(len(workloads))]
        ys = [speed.get((label, engine, w), 0.0) for w in workloads]
        drawn = ax.bar(xs, ys, width, label=f"{label} ({engine})" if label != engine else label)
        ax.bar_label(drawn, fmt="{:,.0f}", fontsize="small")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("output tokens/s")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title or "minisgl bench offline")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load(path: Path) -> tuple[str, dict]:
    report = json.loads(Path(path).read_text())
    runs = report.get("runs") or []
    if not runs or not (all("ttft_ms" in r for r in runs) or all("workload" in r for r in runs)):
        raise ValueError(
            f"{path}: not the JSON of `minisgl bench serve --out` or `minisgl bench offline --out`"
        )
    return report.get("label") or Path(path).stem, report


def is_offline(report: dict) -> bool:
    return all("workload" in r for r in report["runs"])


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    try:
        reports = [load(f) for f in a.files]
    except (OSError, ValueError) as e:
        p.error(str(e))
    offline = {is_offline(rep) for _, rep in reports}
    if len(offline) > 1:
        p.error("the files mix `serve` and `offline` results: plot them apart")
    if offline == {True}:
        plot_offline(reports, a.out, a.title)
    else:
        plot_reports(reports, a.out, a.x, a.title)
    print(f"wrote {a.out}")
    return 0
