#!/usr/bin/env bash
# Our HTTP server beside mini-sglang's, on the same GPU in the same device call (issue 7).
#
#   run(command="bash scripts/gpu_env.sh bash scripts/bench_http_gpu.sh",
#       carry=[".whl", ".gpu-model", ".gpu-bin", ".peers"])
#
# Needs, git-ignored, in the checkout:
#   .whl/         FlashInfer 0.5.3 + deps, pyzmq (../shared/gpu/fetch-wheels.sh), and for mini-sglang's server:
#                 fastapi (0.140.x: later ones need opentelemetry-api), starlette, uvicorn, pydantic,
#                 pydantic_core, annotated_types, typing_inspection, typing_extensions, click, prompt_toolkit,
#                 wcwidth (gpu_env.sh installs them all into /tmp/site)
#   .gpu-model/   config.json and the tokenizer files of Qwen2.5-Coder-0.5B-Instruct (no weights)
#   .gpu-bin/minisgl-sched   a release build of the scheduler
#   .peers/mini-sglang/python   upstream mini-sglang's python/ (git archive of 20fcd7f)
# scripts/bench_carry.sh prepares them all. What the GPU scripts share (starting and stopping the servers, the
# model, the client runs) is in scripts/bench_lib.sh; BENCH_DEVICE=cpu (with MINI_CMD) is a dry run on the CPU.
#
# What it does, each step bounded in time, with the whole script kept under $HTTP_BENCH_BUDGET_S (default 520 s):
#   1. builds Qwen2.5-0.5B's shapes with random bf16 weights (seed 0) in /tmp/model, tokenizer from .gpu-model;
#   2. starts our engine (python -m minisgl.launch, HTTP on :8000), waits for /health, warms up, runs the client;
#   3. stops it, starts mini-sglang's server (:1919, --dummy-weight, FlashInfer, page size 1, graphs up to 256),
#      waits for /v1/models, warms up, runs the same client runs, kills its process group;
#   4. writes to $OUT: http_minisgl.json, http_mini-sglang.json (every client run of each server, by part),
#      http_servers.log (head and tail of each server's log), http_bench.log (this script's output).
# Knobs (environment): BENCH_EXTRA (more client flags for every run), HTTP_BENCH_BUDGET_S, OURS_SHARE_S (when
# our runs must end, from the start), SKIP_OURS=1 / SKIP_MINI=1, PARTS (which client runs, default all of
# "c1 c8 c64 c256 c1024 rate"), RANGE_RATIO (lengths of c64..c1024 and the engine runs spread by this ratio, 0),
# PROMPTS_X (requests per stream in those parts, 4; half that at 1024 streams), RATES and RATE_PROMPTS (the
# rate sweep: 4,16,64,256 requests/s, 64 requests each).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
BENCH_TAG=http_bench
OUT=${OUT:-/tmp/http_out}
RES=/tmp/http_res
LOGS=/tmp/http_logs
# shellcheck source=scripts/bench_lib.sh
. scripts/bench_lib.sh
bench_init http_bench.log

BUDGET=${HTTP_BENCH_BUDGET_S:-560}
OURS_SHARE=${OURS_SHARE_S:-300}
PARTS=${PARTS:-c1 c8 c64 c256 c1024 rate}
log "start: budget ${BUDGET}s, parts: $PARTS, OUT=$OUT"

cleanup() {
  stop_ours
  stop_mini
  servers_log "$OUT/http_servers.log"
  log "done (exit handler)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
scrape_part() { scrape "$RES/minisgl__metrics_$1.json"; }  # part: our /metrics after it
engine_runs() {  # our engine through ZeroMQ at the concurrencies of the HTTP parts: what HTTP is compared with
  local d=$1 c n
  for c in 64 256 1024; do
    has "c$c" || continue
    local x=${PROMPTS_X:-4}
    n=$((c * x)); [ "$c" = 1024 ] && n=$((c * (x > 2 ? x / 2 : x)))
    local tmo=$((d - $(date +%s)))
    [ "$tmo" -gt 90 ] && tmo=90
    [ "$tmo" -lt 20 ] && { log "SKIP engine c$c"; continue; }
    log "RUN engine c$c"
    PYTHONPATH=$OUR_PYTHONPATH timeout -k 5 "$tmo" python3 -m minisgl.bench engine --address tcp://127.0.0.1:5557 \
      --concurrency "$c" --num-prompts "$n" --input-len 128 --output-len 128 --range-ratio "${RANGE_RATIO:-0}" \
      --label minisgl-zmq \
      --out "$RES/minisgl__engine_c$c.json"
    log "END engine c$c: rc=$?"
  done
}
ceiling() {  # the client against our front end over a free engine (instant_server): the client's ceiling
  [ -x .gpu-bin/instant_server ] || { log "SKIP ceiling: no .gpu-bin/instant_server"; return 0; }
  setsid .gpu-bin/instant_server 127.0.0.1:8100 >"$LOGS/instant.log" 2>&1 &
  local pid=$!
  sleep 1
  for k in 8 12; do
    client ceiling http://127.0.0.1:8100 "ceiling_k$k" $(($(date +%s) + 60)) 40 --input-len 16 --output-len 512 \
      --concurrency 256,1024 --num-prompts 2048 --processes "$k"
  done
  kill_group "$pid" 3
}
client_runs() {  # label base deadline
  local l=$1 b=$2 d=$3
  # Warm-up: the first prefills may JIT-compile FlashInfer kernels (a minute on a bare machine).
  client "$l" "$b" warmup "$d" 150 --input-len 128 --output-len 16 --concurrency 16 --num-prompts 32
  local m=: x=${PROMPTS_X:-4} r="--range-ratio ${RANGE_RATIO:-0}"
  [ "$l" = minisgl ] && m=scrape_part && $m warmup
  has c1 && client "$l" "$b" c1 "$d" 60 --input-len 128 --output-len 64 --concurrency 1 --num-prompts 32 && $m c1
  has c8 && client "$l" "$b" c8 "$d" 60 --input-len 128 --output-len 64 --concurrency 8 --num-prompts 64 && $m c8
  # shellcheck disable=SC2086
  has c64 && client "$l" "$b" c64 "$d" 60 --input-len 128 --output-len 128 --concurrency 64 \
    --num-prompts $((64 * x)) $r
  # shellcheck disable=SC2086
  has c256 && client "$l" "$b" c256 "$d" 90 --input-len 128 --output-len 128 --concurrency 256 \
    --num-prompts $((256 * x)) $r
  # shellcheck disable=SC2086
  has c1024 && client "$l" "$b" c1024 "$d" 120 --input-len 128 --output-len 128 --concurrency 1024 \
    --num-prompts $((1024 * (x > 2 ? x / 2 : x))) $r
  # shellcheck disable=SC2086
  has rate && client "$l" "$b" rate "$d" 90 --input-len 128 --output-len 128 --request-rate "${RATES:-4,16,64,256}" \
    --num-prompts "${RATE_PROMPTS:-64}" $r && $m rate
  return 0
}

# ---------------------------------------------------------------------------------------------------- model
build_model 120 || exit 1

# ---------------------------------------------------------------------------------------------- ours
if [ "${SKIP_CEILING:-0}" != 1 ]; then
  ceiling
  combine ceiling "the client against instant_server: our HTTP front end over an engine that costs nothing" \
    "$OUT/http_ceiling.json"
fi
if [ "${SKIP_OURS:-0}" != 1 ]; then
  OURS_DEADLINE=$((T0 + OURS_SHARE))
  wait_tmo=$((OURS_DEADLINE - $(date +%s) - 60))
  [ "$wait_tmo" -gt 240 ] && wait_tmo=240
  if start_ours http "$wait_tmo"; then
    client_runs minisgl http://127.0.0.1:8000 "$OURS_DEADLINE"
    engine_runs "$OURS_DEADLINE"
  fi
  stop_ours
  combine minisgl "ours: minisgl.launch + minisgl-sched (release), page size 16, CUDA graphs, overlap" \
    "$OUT/http_minisgl.json"
fi

# ---------------------------------------------------------------------------------------------- mini-sglang
if [ "${SKIP_MINI:-0}" != 1 ]; then
  log "waiting for the GPU memory to be released"
  wait_gpu_free
  MINI_DEADLINE=$((T0 + BUDGET - 20))
  wait_tmo=$((MINI_DEADLINE - $(date +%s) - 60))
  [ "$wait_tmo" -gt 300 ] && wait_tmo=300
  if start_mini http "$wait_tmo"; then
    client_runs mini-sglang "http://127.0.0.1:$MINI_PORT" "$MINI_DEADLINE"
  fi
  stop_mini
  combine mini-sglang "mini-sglang 20fcd7f: python -m minisgl --dummy-weight --attn fi, page size 1, graphs <= 256" \
    "$OUT/http_mini-sglang.json"
fi

servers_log "$OUT/http_servers.log"
log "finished in $(($(date +%s) - T0)) s"
ls -la "$OUT"
