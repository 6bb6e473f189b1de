#!/usr/bin/env bash
# This tree's worker against an earlier commit's, through the whole engine, in one device call: `minisgl bench
# offline` over issue 12's workloads, the two engines alternated (new, base, new, base, ...) so that drift in
# the machine shows up as the spread between rounds, not as a difference between the engines. By default only
# the Python worker differs: both run the scheduler in .gpu-bin (bench_carry.sh builds it from this tree), so
# the base must speak the same ring protocol (proto/). `prepare REV --scheduler` builds REV's scheduler too
# (release, stripped, into .peers/base/minisgl-sched; ~12 MB of the 64 MiB a call carries), and the base then
# runs on it.
#
#   bash scripts/bench_ab_gpu.sh prepare f3aea59    # here: .peers/base/ (git-ignored) gets that worker
#   bash scripts/bench_carry.sh
#   run(command="bash scripts/gpu_env.sh bash scripts/bench_ab_gpu.sh", carry=[".whl", ".gpu-model", ".gpu-bin", ".peers"])
#
# Each engine runs with the scheduler's step trace on, so the table also gives each common step's time from
# publish to result (the "step answered" lines' in_flight_us, median).
#
# Writes $OUT/ab_{new,base}.N.json (N: the round) and prints a table of every round. Environment:
#   AB_WORKLOADS  default seed,single,decode1,decode16,decode256,prefill16,nanovllm (`minisgl bench offline --workloads`)
#   AB_ROUNDS     rounds of (new, base), default 2
#   AB_BUDGET_S   no engine starts past this many seconds, default 480 (a device call may run 600)
#   AB_NEW_FLAGS, AB_BASE_FLAGS   more `minisgl serve` flags for each engine, e.g. to compare two settings of
#                 one tree: `prepare HEAD`, then AB_NEW_FLAGS="--extend-graph-tokens 8192"
#   BENCH_DEVICE  cpu: a dry run on a machine without a GPU (a tiny random model, the tiny workloads)
#   PYTHON        the interpreter, default python3 (a dry run here: PYTHON=.venv/bin/python)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$PWD
say() { printf '[bench_ab %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

if [ "${1:-run}" = prepare ]; then
  rev=${2:?usage: bash scripts/bench_ab_gpu.sh prepare REV [--scheduler]}
  grep -qxF /.peers/ .git/info/exclude 2>/dev/null || echo /.peers/ >>.git/info/exclude
  rm -rf .peers/base && mkdir -p .peers/base || exit 1
  git archive "$rev" worker_py | tar -x -C .peers/base || exit 1
  git rev-parse --short "$rev" >.peers/base/REV
  if [ "${3:-}" = --scheduler ]; then
    # A worktree at REV, built into a target directory of its own (kept: later builds only redo what changed).
    tree=$(mktemp -d)/base
    git worktree add -q --detach "$tree" "$rev" || exit 1
    (cd "$tree" && cargo build --release -q -p minisgl-scheduler --bin minisgl-sched --target-dir "$root/target/ab-base")
    built=$?
    git worktree remove --force "$tree"
    [ $built -eq 0 ] || exit 1
    strip -o .peers/base/minisgl-sched target/ab-base/release/minisgl-sched || exit 1
    say ".peers/base/minisgl-sched built at $rev"
  else
    git diff --quiet "$rev" HEAD -- proto || say "WARNING: proto/ changed since $rev: the base may not speak this ring"
  fi
  say ".peers/base holds the worker of $(git log -1 --format='%h %s' "$rev" | cut -c1-90)"
  exit 0
fi
[ "${1:-run}" = run ] || { echo "usage: bash scripts/bench_ab_gpu.sh [prepare REV | run]" >&2; exit 2; }
[ -f .peers/base/REV ] || { say "no .peers/base: run 'bash scripts/bench_ab_gpu.sh prepare REV' first"; exit 1; }

OUT=${OUT:-/tmp/ab_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${MINISGL_SCHED:-}" ]; then
  MINISGL_SCHED=$PWD/.gpu-bin/minisgl-sched
  [ -x "$MINISGL_SCHED" ] || MINISGL_SCHED=$PWD/target/release/minisgl-sched
fi
export MINISGL_SCHED
# The tokenizer by its absolute path: the base's package would look for it beside itself.
tok=$PWD/.gpu-model
[ -f "$tok/tokenizer.json" ] || tok=$PWD/models/Qwen2.5-Coder-0.5B-Instruct
if [ "${BENCH_DEVICE:-cuda}" = cpu ]; then
  args=(--tiny --device cpu --tokenizer-dir "$tok")
else
  workloads=${AB_WORKLOADS:-seed,single,decode1,decode16,decode256,prefill16,nanovllm}
  args=(--random-weights --tokenizer-dir "$tok" --workloads "$workloads")
  nvidia-smi --query-gpu=name --format=csv,noheader 2>&1 | sed 's/^/[gpu] /'
fi
say "this tree ($(git log -1 --format=%h 2>/dev/null || echo '?')) ${AB_NEW_FLAGS:-} against $(cat .peers/base/REV) ${AB_BASE_FLAGS:-}"
for ((round = 0; round < ${AB_ROUNDS:-2}; round++)); do
  for engine in new base; do
    if [ "$SECONDS" -gt "${AB_BUDGET_S:-480}" ]; then
      say "skipping $engine, round $round: past ${AB_BUDGET_S:-480} s"
      continue
    fi
    worker=$PWD/worker_py sched=$MINISGL_SCHED flags=${AB_NEW_FLAGS:-}
    if [ "$engine" = base ]; then
      flags=${AB_BASE_FLAGS:-}
      worker=$PWD/.peers/base/worker_py
      [ -x .peers/base/minisgl-sched ] && sched=$PWD/.peers/base/minisgl-sched
    fi
    say "$engine, round $round"
    PYTHONPATH=$worker${PYTHONPATH:+:$PYTHONPATH} MINISGL_SCHED=$sched timeout 150 "$PYTHON" -m minisgl.bench \
      offline "${args[@]}" --no-progress --label "$engine" --out "$OUT/ab_$engine.$round.json" \
      --engine-flags "--log-level info,scheduler::engine=debug${flags:+ $flags}" >"$OUT/ab_$engine.$round.log" 2>&1
    grep -v "scheduler::engine" "$OUT/ab_$engine.$round.log" | tail -3
  done
done
"$PYTHON" scripts/bench_ab_table.py "$OUT"/ab_*.json "$OUT"/ab_*.log |
  tee "$OUT/ab_table.md"
