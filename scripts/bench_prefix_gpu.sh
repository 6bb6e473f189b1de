#!/usr/bin/env bash
# Issue 9's acceptance figures on the H200 in one device call (the tool allows 600 s): the prefix cache on and
# off, mixed prefill+decode steps, and mini-sglang beside us on the shared-prefix workload.
#
#   run(command="bash scripts/gpu_env.sh bash scripts/bench_prefix_gpu.sh",
#       carry=[".whl", ".gpu-model", ".gpu-bin", ".peers"])
#
# Needs the git-ignored files of scripts/bench_http_gpu.sh (.whl with FlashInfer, pyzmq and mini-sglang's server
# wheels; .gpu-model with the tokenizer; .gpu-bin/minisgl-sched, a release build of the scheduler AS IT IS NOW;
# .peers/mini-sglang/python). scripts/bench_carry.sh prepares them all.
#
# Qwen2.5-0.5B's shapes with random bf16 weights (seed 0), built on the machine. Every client run is
# `minisgl bench serve` (chat, streamed, ignore_eos, temperature 0, 8 client processes) with every request sent
# at once after one warm-up request of other prompts; TTFT from before the send. In this order:
#   ours, cache on ($CACHE_ON_FLAGS), after a server warm-up (32 short requests):
#     (a) 64 requests: one 2,000-word system prompt + a 50-word question each, 64 tokens out. Round 1: the
#         system prompt is new to the server; round 2 (and more, A_ROUNDS): the same system prompt, new questions
#     (b) 32 conversations x 6 turns, each turn +200 words and 128 tokens out, the whole history each turn
#     (d) `minisgl bench stall`: 32 streams decoding (3,000 tokens each), then 2 prompts of 16,000 words, 1.2 s
#         apart: the streams' inter-token gaps before, during each prefill (its send to its first token), after
#   ours, cache off ($CACHE_OFF_FLAGS, default --no-prefix-cache): the server warm-up, (a), (b)
#   (c) `minisgl bench offline --workloads nanovllm` on the same model: an engine of its own, defaults
#   (e) mini-sglang (radix cache, its default; + $MINI_RADIX_FLAGS): the server warm-up, (a); then with
#       $MINI_NAIVE_FLAGS (default `--cache-type naive`: no cache) if MINI_NOCACHE=1, or =auto (the default)
#       with MINI_NOCACHE_MIN_S (150) still left
# Flags in CACHE_ON_FLAGS, CACHE_OFF_FLAGS and OURS_FLAGS (both our servers) that `python -m minisgl.launch
# --help` does not list are dropped with a warning (so the script runs before they exist).
#
# Writes to $OUT: prefix_<label>.json (label: ours-on, ours-off, offline, mini-radix, mini-naive; every part
# of that server: the client's JSON, /metrics after each part of ours), prefix_summary.txt (the table printed
# at the end; `python3 scripts/bench_prefix_summary.py DIR` prints it again from the JSON files),
# prefix_servers.log (head and tail of every server's log), prefix_bench.log (all of this script's output).
#
# Knobs (environment): PREFIX_BENCH_BUDGET_S (540: the whole), ON_END_S / OFF_END_S / C_END_S (250 / 340 /
# 400: when each of our phases must end, seconds from the start), SKIP_ON / SKIP_OFF / SKIP_C / SKIP_MINI=1,
# A_PROMPTS A_PREFIX A_QUESTION A_OUT A_ROUNDS (64 2000 50 64 2), B_CONVS B_TURNS B_IN B_OUT (32 6 200 128),
# D_STREAMS D_STREAM_IN D_STREAM_OUT D_LONG D_LONG_COUNT D_DELAY_S D_SPACING_S (32 128 3000 16000 2 1.0 1.2),
# D_CACHE_OFF=1 (stall on the cache-off server too), C_WORKLOADS (nanovllm), C_FLAGS (`minisgl serve` flags for
# the offline engine), OURS_FLAGS, MINI_PARTS ("a"; "a b" adds the multi-turn), MINI_NOCACHE, BENCH_EXTRA
# (more flags for every `bench serve`), CLIENT_PROCESSES (8), and scripts/bench_lib.sh's.
#
# A dry run on the CPU, tiny sizes, a tiny random model, the stand-in server in mini-sglang's place (minutes):
#   SMALL=1 BENCH_DEVICE=cpu PATH=$PWD/.venv/bin:$PATH MINI_CMD="exec python3 -m minisgl.bench.standin --port 1919" \
#     MINI_RADIX_FLAGS=--prefix-cache MINI_NAIVE_FLAGS= bash scripts/bench_prefix_gpu.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
BENCH_TAG=prefix_bench
OUT=${OUT:-/tmp/prefix_out}
# shellcheck source=scripts/bench_lib.sh
. scripts/bench_lib.sh
bench_init prefix_bench.log

BUDGET=${PREFIX_BENCH_BUDGET_S:-540}
SMALL=${SMALL:-0}
if [ "$SMALL" = 1 ]; then  # sizes for a dry run on the CPU
  A_PROMPTS=${A_PROMPTS:-8} A_PREFIX=${A_PREFIX:-200} A_QUESTION=${A_QUESTION:-20} A_OUT=${A_OUT:-8}
  B_CONVS=${B_CONVS:-4} B_TURNS=${B_TURNS:-3} B_IN=${B_IN:-30} B_OUT=${B_OUT:-8}
  D_STREAMS=${D_STREAMS:-4} D_STREAM_IN=${D_STREAM_IN:-16} D_STREAM_OUT=${D_STREAM_OUT:-400}
  D_LONG=${D_LONG:-1500} D_DELAY_S=${D_DELAY_S:-1.5}
  WARM=(--input-len 16 --output-len 4 --concurrency 4 --num-prompts 8)
  CLIENT_PROCESSES=${CLIENT_PROCESSES:-2}
  ON_END_S=${ON_END_S:-900} OFF_END_S=${OFF_END_S:-1300} C_END_S=${C_END_S:-1500}
  BUDGET=${PREFIX_BENCH_BUDGET_S:-2400}
else
  WARM=(--input-len 128 --output-len 16 --concurrency 16 --num-prompts 32)
fi
A_PROMPTS=${A_PROMPTS:-64} A_PREFIX=${A_PREFIX:-2000} A_QUESTION=${A_QUESTION:-50} A_OUT=${A_OUT:-64}
A_ROUNDS=${A_ROUNDS:-2}
B_CONVS=${B_CONVS:-32} B_TURNS=${B_TURNS:-6} B_IN=${B_IN:-200} B_OUT=${B_OUT:-128}
D_STREAMS=${D_STREAMS:-32} D_STREAM_IN=${D_STREAM_IN:-128} D_STREAM_OUT=${D_STREAM_OUT:-3000}
D_LONG=${D_LONG:-16000} D_LONG_COUNT=${D_LONG_COUNT:-2} D_DELAY_S=${D_DELAY_S:-1.0} D_SPACING_S=${D_SPACING_S:-1.2}
ON_END_S=${ON_END_S:-250} OFF_END_S=${OFF_END_S:-340} C_END_S=${C_END_S:-400}
CLIENT_PROCESSES=${CLIENT_PROCESSES:-8}
CACHE_ON_FLAGS=${CACHE_ON_FLAGS-}
CACHE_OFF_FLAGS=${CACHE_OFF_FLAGS---no-prefix-cache}
OURS_FLAGS=${OURS_FLAGS-}
MINI_PARTS=${MINI_PARTS:-a}
MINI_NOCACHE=${MINI_NOCACHE:-auto}
MINI_NOCACHE_MIN_S=${MINI_NOCACHE_MIN_S:-150}
MINI_RADIX_FLAGS=${MINI_RADIX_FLAGS-}
MINI_NAIVE_FLAGS=${MINI_NAIVE_FLAGS---cache-type naive}
log "start: budget ${BUDGET}s, SMALL=$SMALL, device $BENCH_DEVICE, OUT=$OUT; (a) $A_PROMPTS x ($A_PREFIX + \
$A_QUESTION words) -> $A_OUT, $A_ROUNDS rounds; (b) $B_CONVS x $B_TURNS turns x $B_IN words -> $B_OUT; (d) \
$D_STREAMS streams -> $D_STREAM_OUT, $D_LONG_COUNT x $D_LONG words"

cleanup() {
  stop_ours
  stop_mini
  servers_log "$OUT/prefix_servers.log"
  log "done (exit handler)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# The flags of $* that our launcher knows; the others are dropped (with the value after them), and said so.
LAUNCH_HELP=$(python3 -m minisgl.launch --help 2>&1)
known_flags() {
  local out=() skip_value=0 f
  for f in "$@"; do
    if [ "$skip_value" = 1 ] && [ "${f#--}" = "$f" ]; then skip_value=0; continue; fi
    skip_value=0
    if [ "${f#--}" != "$f" ] && ! grep -q -- "${f%%=*}\b" <<<"$LAUNCH_HELP"; then
      log "WARNING: our launcher has no ${f%%=*}: left out" >&2
      skip_value=1
      continue
    fi
    out+=("$f")
  done
  echo "${out[*]}"
}
# shellcheck disable=SC2086
{
  ON_FLAGS=$(known_flags $OURS_FLAGS $CACHE_ON_FLAGS)
  OFF_FLAGS=$(known_flags $OURS_FLAGS $CACHE_OFF_FLAGS)
}
log "our flags: cache on: '$ON_FLAGS'; cache off: '$OFF_FLAGS'"
[ "$ON_FLAGS" = "$OFF_FLAGS" ] && log "WARNING: both of our servers run with the same flags: 'cache off' is not off"

# ---------------------------------------------------------------------------------------------------- parts
part_a() {  # label base deadline: the shared system prompt, A_ROUNDS rounds
  local r
  for r in $(seq "$A_ROUNDS"); do
    client "$1" "$2" "a$r" "$3" 60 --workload shared-prefix --num-prompts "$A_PROMPTS" --prefix-len "$A_PREFIX" \
      --input-len "$A_QUESTION" --output-len "$A_OUT" --prefix-seed 100 --seed "$r" --warmup 1 --request-rate inf
    [ -n "${4:-}" ] && $4 "a$r"
  done
  return 0
}
part_b() {  # label base deadline [after]: multi-turn
  client "$1" "$2" b "$3" 90 --workload multi-turn --num-prompts "$B_CONVS" --turns "$B_TURNS" --input-len "$B_IN" \
    --output-len "$B_OUT" --seed 7 --warmup 1 --request-rate inf
  [ -n "${4:-}" ] && $4 b
  return 0
}
part_d() {  # label base deadline [after]: decodes while long prompts are prefilled
  local tmo=$(($3 - $(date +%s)))
  [ "$tmo" -gt 90 ] && tmo=90
  if [ "$tmo" -lt 20 ]; then
    log "SKIP $1 d: ${tmo}s left"
    return 0
  fi
  local cmd=(python3 -m minisgl.bench stall --base-url "$2" --streams "$D_STREAMS" --stream-input-len "$D_STREAM_IN"
    --stream-output-len "$D_STREAM_OUT" --long-input-len "$D_LONG" --long-count "$D_LONG_COUNT"
    --delay-s "$D_DELAY_S" --spacing-s "$D_SPACING_S" --processes "$CLIENT_PROCESSES" --label "$1"
    --out "$RES/${1}__d.json")
  log "RUN $1 d (timeout ${tmo}s): ${cmd[*]}"
  local t
  t=$(date +%s)
  PYTHONPATH=$OUR_PYTHONPATH timeout -k 5 "$tmo" "${cmd[@]}"
  log "END $1 d: rc=$? in $(($(date +%s) - t))s"
  [ -n "${4:-}" ] && $4 d
  return 0
}
# A warm-up of other prompts than the measured ones, so that no part pays a first use (FlashInfer's JIT build,
# Triton's compiles, the first steps of each kind): short requests arriving while others decode (mixed steps),
# prefills after a cached prefix, and, on our server, a prompt as long as (d)'s (chunked prefills).
warm_server() {  # label base deadline [after]
  client "$1" "$2" warmup_short "$3" 150 "${WARM[@]}" --seed 999
  client "$1" "$2" warmup_prefix "$3" 60 --workload shared-prefix --prefix-len "$((A_PREFIX / 2))" \
    --input-len "$A_QUESTION" --output-len 8 --num-prompts 16 --concurrency 4 --prefix-seed 900 --seed 901
  case $1 in ours-*) client "$1" "$2" warmup_long "$3" 60 --input-len "$D_LONG" --output-len 4 --num-prompts 2 \
    --concurrency 2 --seed 902 ;; esac
  [ -n "${4:-}" ] && $4 warmup
  return 0
}
metrics_on() { scrape "$RES/ours-on__metrics_$1.json"; }
metrics_off() { scrape "$RES/ours-off__metrics_$1.json"; }

ours_phase() {  # label end_s after flags: one of our servers and its parts
  local label=$1 end=$((T0 + $2)) after=$3 flags=$4
  wait_gpu_free  # the KV cache takes a share of the memory that is free when the worker starts
  local wait_s=$((end - $(date +%s) - 60))
  [ "$wait_s" -gt 240 ] && wait_s=240
  if [ "$wait_s" -lt 20 ]; then
    log "SKIP $label: no time left to start it"
    return 0
  fi
  # shellcheck disable=SC2086
  if start_ours "$label" "$wait_s" $flags; then
    local base="http://$OURS_HTTP"
    warm_server "$label" "$base" "$end" "$after"
    part_a "$label" "$base" "$end" "$after"
    part_b "$label" "$base" "$end" "$after"
    if [ "$label" = ours-on ] || [ "${D_CACHE_OFF:-0}" = 1 ]; then part_d "$label" "$base" "$end" "$after"; fi
    if ! kill -0 "$OURS_PID" 2>/dev/null; then
      log "FAILED: our engine ($label) died during the parts; the last lines of its log:"
      tail -n 25 "$LOGS/ours_$label.log"
    fi
  fi
  stop_ours
  grep -h "steps run" "$LOGS/ours_$label.log" 2>/dev/null | tail -n 2 | sed "s/\x1b\[[0-9;]*m//g; s/^/[$label] /"
  combine "$label" "ours ($label): minisgl.launch + minisgl-sched (release), flags: $flags" "$OUT/prefix_$label.json"
}

# ---------------------------------------------------------------------------------------------------- run
build_model 120 || exit 1

[ "${SKIP_ON:-0}" = 1 ] || ours_phase ours-on "$ON_END_S" metrics_on "$ON_FLAGS"
[ "${SKIP_OFF:-0}" = 1 ] || ours_phase ours-off "$OFF_END_S" metrics_off "$OFF_FLAGS"

if [ "${SKIP_C:-0}" != 1 ]; then
  wait_gpu_free
  tmo=$((T0 + C_END_S - $(date +%s)))
  if [ "$tmo" -ge 30 ]; then
    cmd=(python3 -m minisgl.bench offline --model "$MODEL" --workloads "${C_WORKLOADS:-nanovllm}" --log-level info
      --no-progress --label minisgl --out "$RES/offline__c.json")
    on_gpu || cmd+=(--device cpu --tiny)
    [ -n "${C_FLAGS:-}" ] && cmd+=(--engine-flags "$C_FLAGS")
    log "RUN offline c (timeout ${tmo}s): ${cmd[*]} (its output in $LOGS/offline.log)"
    t=$(date +%s)
    PYTHONPATH=$OUR_PYTHONPATH MINISGL_SCHED=$SCHED_BIN timeout -k 5 "$tmo" "${cmd[@]}" >"$LOGS/offline.log" 2>&1
    log "END offline c: rc=$? in $(($(date +%s) - t))s"
    grep -E "^(engine|overlap|no overlap|#)|steps run|rror" "$LOGS/offline.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 12
    combine offline "minisgl bench offline (its own engine, the defaults)" "$OUT/prefix_offline.json"
  else
    log "SKIP offline c: ${tmo}s left"
  fi
fi

mini_phase() {  # label [flags]: mini-sglang and its parts, until the budget's end
  local label=$1 end=$((T0 + BUDGET - 15))
  shift
  wait_gpu_free
  local wait_s=$((end - $(date +%s) - 40))
  [ "$wait_s" -gt 240 ] && wait_s=240
  if [ "$wait_s" -lt 30 ]; then
    log "SKIP $label: ${wait_s}s left to start it"
    return 0
  fi
  if start_mini "$label" "$wait_s" "$@"; then
    local base="http://127.0.0.1:$MINI_PORT"
    warm_server "$label" "$base" "$end"
    case " $MINI_PARTS " in *" a "*) part_a "$label" "$base" "$end" ;; esac
    case " $MINI_PARTS " in *" b "*) part_b "$label" "$base" "$end" ;; esac
  fi
  stop_mini
  combine "$label" "mini-sglang 20fcd7f: --dummy-weight --attn fi, page size 1, graphs <= 256 $*" "$OUT/prefix_$label.json"
}
if [ "${SKIP_MINI:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  mini_phase mini-radix $MINI_RADIX_FLAGS
  if [ "$MINI_NOCACHE" = 1 ] || { [ "$MINI_NOCACHE" = auto ] && [ "$(left)" -ge "$MINI_NOCACHE_MIN_S" ]; }; then
    # shellcheck disable=SC2086
    mini_phase mini-naive $MINI_NAIVE_FLAGS
  else
    log "SKIP mini-naive: $(left)s left (MINI_NOCACHE=$MINI_NOCACHE, at least ${MINI_NOCACHE_MIN_S}s wanted)"
  fi
fi

servers_log "$OUT/prefix_servers.log"
log "finished in $(($(date +%s) - T0)) s"
# shellcheck disable=SC2012
ls -la "$OUT" | tail -n 20
python3 scripts/bench_prefix_summary.py "$OUT" | tee "$OUT/prefix_summary.txt"
