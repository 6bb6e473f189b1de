#!/usr/bin/env bash
# Issue 12's first-token figure: one client, chat completions, streaming, 64 tokens a request (prompts of 128
# random words, none of them cached but the chat template's), through our HTTP server; `minisgl bench serve`
# times the first token from before each request is sent. Our engine runs with the flags of each
# ENGINE_VARIANTS entry (';'-separated), one after the other in one device call (default: none, and
# "--no-extend-graphs": small prefills replayed from graphs, and eager). TTFT_INPUT_LEN sets the prompts'
# words (default 128); with ENGINE_VARIANTS="; --extend-graph-tokens 8192" TTFT_INPUT_LEN=1500 it measures
# what extend graphs do for prompts past the token-row graphs' 512 tokens.
#
#   bash scripts/bench_carry.sh
#   run(command="bash scripts/gpu_env.sh bash scripts/bench_ttft_gpu.sh", carry=[".whl", ".gpu-model", ".gpu-bin"])
#
# Writes to $OUT: ttft_bench.log, ttft_<variant>__{warmup,c1}.json (the client's reports), ttft_servers.log.
# BENCH_DEVICE=cpu is a dry run on the development machine (a tiny random model, fewer requests).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
BENCH_TAG=ttft
OUT=${OUT:-/tmp/ttft_out}
RES=$OUT
LOGS=/tmp/ttft_logs
# shellcheck source=scripts/bench_lib.sh
. scripts/bench_lib.sh
bench_init ttft_bench.log
BUDGET=${TTFT_BUDGET_S:-300}
REQUESTS=${TTFT_REQUESTS:-32}
INPUT_LEN=${TTFT_INPUT_LEN:-128}
on_gpu || REQUESTS=4
trap 'stop_ours; servers_log "$OUT/ttft_servers.log"' EXIT

build_model 120 || exit 1
VARIANTS=("" "--no-extend-graphs")
[ -n "${ENGINE_VARIANTS:-}" ] && IFS=';' read -r -a VARIANTS <<<"$ENGINE_VARIANTS"
for flags in "${VARIANTS[@]}"; do
  name=${flags:-default}
  name=${name//[^a-z0-9-]/}
  name=${name#--}
  deadline=$((T0 + BUDGET))
  # shellcheck disable=SC2086
  if start_ours "$name" 150 $flags; then
    client "ttft_$name" http://$OURS_HTTP warmup "$deadline" 60 --input-len 128 --output-len 16 --concurrency 4 \
      --num-prompts 8 --processes 1 --seed 1
    client "ttft_$name" http://$OURS_HTTP c1 "$deadline" 90 --input-len "$INPUT_LEN" --output-len 64 --concurrency 1 \
      --num-prompts "$REQUESTS" --processes 1 --seed 2
  fi
  stop_ours
done

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("ttft_*__c1.json")):
    run = json.loads(path.read_text())
    runs = run.get("runs", [run])
    for r in runs:
        t, p = r.get("ttft_ms", {}), r.get("tpot_ms", {})
        print(f"[ttft] {path.stem}: {r.get('completed')} requests, TTFT p50 {t.get('p50') or float('nan'):.2f} ms "
              f"p90 {t.get('p90') or float('nan'):.2f} ms, TPOT p50 {p.get('p50') or float('nan'):.3f} ms")
EOF
