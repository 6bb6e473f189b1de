"""The summary table of scripts/bench_prefix_gpu.sh (issue 9 on the H200), from the prefix_<label>.json files
it writes: `python3 scripts/bench_prefix_summary.py DIR` (DIR: its $OUT, or the files that came back).

Per part (a: shared system prompt, b: multi-turn, c: nano-vllm offline, d: decodes during a long prefill,
e: mini-sglang on a) the figures issue 9 asks for, our engine's steps in each part (from /metrics before and
after it), and the goals. Standard library only; any figure may be missing (a part skipped or failed)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

SERVERS = (  # label, name in the tables
    ("ours-on", "ours, cache on"),
    ("ours-off", "ours, cache off"),
    ("mini-radix", "mini-sglang radix"),
    ("mini-naive", "mini-sglang naive"),
)
METRIC = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
HEAD = (
    f"{'ok/fail':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>8} {'out tok/s':>10} {'wall s':>7} {'cached':>6}"
)
W = 19  # the server column


def f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def load(folder: Path) -> dict:
    docs = {}
    for path in sorted(folder.glob("prefix_*.json")):
        try:
            docs[path.stem[len("prefix_") :]] = json.loads(path.read_text())
        except ValueError as e:
            print(f"(unreadable: {path.name}: {e})")
    return docs


def parts_of(docs: dict, label: str) -> dict:
    return (docs.get(label) or {}).get("parts", {})


def first_run(part) -> dict | None:
    if isinstance(part, dict) and part.get("runs"):
        return part["runs"][0]
    return None


def config_of(docs: dict, part: str) -> dict:
    for label, _ in SERVERS:
        report = parts_of(docs, label).get(part)
        if isinstance(report, dict) and report.get("config"):
            return report["config"]
    return {}


def metrics(scrape) -> dict:
    """{(name, labels): value} of one /metrics scrape."""
    out = {}
    for line in (scrape or {}).get("metrics", []):
        m = METRIC.match(line.strip())
        if m:
            with contextlib.suppress(ValueError):
                out[(m["name"], m["labels"] or "")] = float(m["value"])
    return out


def steps(parts: dict, part: str, previous: str | None) -> str:
    """Our steps during `part`, by kind (count x mean time), and the cache counters that moved, from the
    scrapes after `previous` and after `part`."""
    after = metrics(parts.get(f"metrics_{part}"))
    if not after:
        return ""
    before = metrics(parts.get(f"metrics_{previous}")) if previous else {}
    count, total = "minisgl_step_duration_seconds_count", "minisgl_step_duration_seconds_sum"
    out = []
    for (name, labels), value in sorted(after.items()):
        if name == count:
            n = value - before.get((name, labels), 0.0)
            seconds = after.get((total, labels), 0.0) - before.get((total, labels), 0.0)
            kind = re.search(r'kind="([^"]*)"', labels)
            if n > 0:
                out.append(f"{kind[1] if kind else labels} {n:.0f}x{1000 * seconds / n:.2f}ms")
    for (name, labels), value in sorted(after.items()):
        if ("cache" in name or "cached" in name) and name.endswith("_total"):
            d = value - before.get((name, labels), 0.0)
            if d:
                out.append(
                    f"{name.removeprefix('minisgl_')}{{{labels}}} +{d:.0f}" if labels else f"{name} +{d:.0f}"
                )
    return " ".join(out)


def cached(run: dict) -> str:
    if run.get("cached_tokens") is None or not run.get("input_tokens"):
        return "-"
    return f"{100.0 * run['cached_tokens'] / run['input_tokens']:.0f}%"


def row(run: dict) -> str:
    """The columns of HEAD for one run of `minisgl bench serve`."""
    ttft, tpot = run["ttft_ms"], run["tpot_ms"]
    return (
        f"{run['completed']:>5}/{run['failed']:<2} {f(ttft['p50']):>9} {f(ttft['p99']):>8} "
        f"{f(tpot['p50'], 2):>8} {f(run['output_tok_per_s'], 0):>10} {f(run['duration_s'], 2):>7} "
        f"{cached(run):>6}"
    )


def errors(run: dict, p) -> None:
    for error, count in list(run.get("errors", {}).items())[:2]:
        p(f"{'':>{W}} {count} failed: {error[:150]}")


def part_a(docs: dict, p) -> dict:
    c = config_of(docs, "a1").get
    p(
        f"(a) {c('num_prompts', '?')} requests: one {c('prefix_len', '?')}-word system prompt + "
        f"{c('input_len', '?')}-word questions, {c('output_len', '?')} tokens out, all at once. Round 1: "
        "a new system prompt; later rounds: the same one, new questions. Times in ms"
    )
    p(f"{'server':<{W}} {'round':>5} {HEAD}  steps (count x mean)")
    ttft = {}
    for label, name in SERVERS:
        parts = parts_of(docs, label)
        previous = "warmup"
        for part in sorted(k for k in parts if re.fullmatch(r"a\d+", k)):
            run = first_run(parts[part])
            if run is None:
                p(f"{name:<{W}} {part[1:]:>5} (no result)")
                continue
            ttft[(label, part)] = run["ttft_ms"]["p50"]
            p(f"{name:<{W}} {part[1:]:>5} {row(run)}  {steps(parts, part, previous)}")
            errors(run, p)
            previous = part
    return ttft


def part_b(docs: dict, p) -> None:
    c = config_of(docs, "b").get
    p(
        f"(b) {c('num_prompts', '?')} conversations x {c('turns', '?')} turns, +{c('input_len', '?')} words "
        f"a turn, {c('output_len', '?')} tokens out, all at once; below each: TTFT p50 (cached share) by turn"
    )
    p(f"{'server':<{W}} {HEAD}  steps (count x mean)")
    for label, name in SERVERS:
        parts = parts_of(docs, label)
        if "b" not in parts:
            continue
        run = first_run(parts["b"])
        if run is None:
            p(f"{name:<{W}} (no result)")
            continue
        previous = max((k for k in parts if re.fullmatch(r"a\d+", k)), default="warmup")
        p(f"{name:<{W}} {row(run)}  {steps(parts, 'b', previous)}")
        turns = ", ".join(
            f"{t['turn']}: {f(t['ttft_ms']['p50'])} ({cached(t)})" for t in run.get("by_turn") or []
        )
        if turns:
            p(f"{'':>{W}} by turn: {turns}")
        errors(run, p)


def part_c(docs: dict, p) -> float | None:
    offline = parts_of(docs, "offline").get("c")
    if not (isinstance(offline, dict) and offline.get("runs")):
        p("(c) offline nano-vllm: no result (see prefix_bench.log)")
        return None
    tok = None
    for r in offline["runs"]:
        if r["workload"] == "nanovllm":
            tok = r["output_tok_per_s"]
        p(
            f"(c) offline {r['workload']} ({r['requests']} requests, engine '{r['engine']}'): "
            f"{f(r['output_tok_per_s'], 0)} tok/s, {r['output_tokens']:,} tokens in {f(r['seconds'], 3)} s "
            f"(engine start {f(r['startup_s'])} s)"
        )
    return tok


def part_d(docs: dict, p) -> None:
    for label, name in SERVERS:
        d = parts_of(docs, label).get("d")
        if not isinstance(d, dict) or "gaps_ms" not in d:
            continue
        cfg, s = d.get("config", {}), d["streams"]
        p(
            f"(d) {name}: {s['completed']}/{s['failed']} streams of {cfg.get('stream_output_len', '?')} "
            f"tokens ({s['decoding_before_long']} decoding before the first long prompt), "
            f"{cfg.get('long_count', '?')} prompts of {cfg.get('long_input_len', '?')} words; gaps between a "
            "stream's tokens, ms:"
        )
        during = steps(parts_of(docs, label), "d", "b")
        p(f"{'':>4}{'window':>8} {'gaps':>7} {'mean':>8} {'p50':>8} {'p99':>8} {'max':>8}   steps: {during}")
        for window, g in d["gaps_ms"].items():
            p(
                f"{'':>4}{window:>8} {g['gaps']:>7} {f(g['mean_ms'], 2):>8} {f(g['p50_ms'], 2):>8} "
                f"{f(g['p99_ms'], 2):>8} {f(g['max_ms'], 2):>8}"
            )
        for ev, lp in zip(d["events"], d["long"], strict=False):
            if not ev.get("ok"):
                p(f"    long {ev['index']}: failed: {str(lp.get('error'))[:150]}")
                continue
            p(
                f"    long {ev['index']}: {lp['prompt_tokens']} tokens ({f(lp['cached_tokens'], 0)} cached), "
                f"prefill {f(ev['prefill_ms'])} ms; gaps during it: max {f(ev['max_gap_ms'], 2)}, "
                f"p99 {f(ev['p99_gap_ms'], 2)}; tokens per stream meanwhile: min "
                f"{ev['tokens_per_stream_min']}, mean {f(ev['tokens_per_stream_mean'])} "
                f"({ev['streams_without_token']} of {ev['streams_through']} got none)"
            )
        for error, count in list(s.get("errors", {}).items())[:2]:
            p(f"    {count} streams failed: {error[:150]}")


def goals(docs: dict, ttft: dict, c_tok: float | None, p) -> None:
    p("goals:")
    for part in sorted({k[1] for k in ttft}):
        on, off = ttft.get(("ours-on", part)), ttft.get(("ours-off", part))
        ratio = f"x{off / on:.2f}" if on and off else "-"
        mini = f"radix {f(ttft.get(('mini-radix', part)))}, naive {f(ttft.get(('mini-naive', part)))}"
        p(
            f"  (a) round {part[1:]}: TTFT p50 cache off / on = {f(off)} / {f(on)} ms = {ratio} "
            f"(goal >= x3); mini-sglang {mini}"
        )
    p(f"  (c) nano-vllm offline {f(c_tok, 0)} tok/s (goal >= 60,000; before issue 9: ~49,000-55,000)")
    for label in ("ours-on", "ours-off"):
        parts = parts_of(docs, label)
        runs = [first_run(v) for k, v in parts.items() if re.fullmatch(r"a\d+|b", k)]
        known = [r for r in runs if r and r.get("cached_tokens") is not None]
        if label == "ours-off" and any(r["cached_tokens"] for r in known):
            p("  WARNING: the cache-off server reported cached tokens: was it off?")
        if label == "ours-on" and any(runs) and not known:
            p("  note: the cache-on server reported no usage.prompt_tokens_details.cached_tokens")
        if not parts:
            p(f"  (no results from {label})")


def main(argv: list[str]) -> int:
    docs = load(Path(argv[1] if len(argv) > 1 else "."))
    lines: list[str] = []
    p = lines.append
    any_doc = next(iter(docs.values()), {})
    where = f"{any_doc.get('gpu') or '?'}, {any_doc.get('date_utc', '?')}"
    p(f"==== issue 9: prefix cache, mixed steps ({where}) ====")
    ttft = part_a(docs, p)
    part_b(docs, p)
    c_tok = part_c(docs, p)
    part_d(docs, p)
    goals(docs, ttft, c_tok, p)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
