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
ROOT=$PWD
OUT=${OUT:-/tmp/http_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/http_bench.log") 2>&1

T0=$(date +%s)
BUDGET=${HTTP_BENCH_BUDGET_S:-560}
OURS_SHARE=${OURS_SHARE_S:-300}
PARTS=${PARTS:-c1 c8 c64 c256 c1024 rate}
RES=/tmp/http_res
LOGS=/tmp/http_logs
MODEL=/tmp/model
mkdir -p "$RES" "$LOGS"

log() { printf '[http_bench %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
left() { echo $((T0 + BUDGET - $(date +%s))); }
# The python3 of the device, without mini-sglang on its path: our package and the client.
OUR_PYTHONPATH=${PYTHONPATH:-}
log "start: budget ${BUDGET}s, parts: $PARTS, OUT=$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
log "open files limit: $(ulimit -n) (1024 streams need more than the usual 1024)"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/[gpu] /'
python3 - <<'EOF' 2>&1 | sed 's/^/[versions] /'
import importlib.metadata as m
for p in ("torch", "flashinfer-python", "pyzmq", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core",
          "anyio", "h11", "uvloop", "httptools", "aiohttp", "tqdm", "typing_extensions", "annotated-doc", "transformers"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "MISSING")
try:  # what mini-sglang's server imports beyond the worker's packages
    import fastapi, prompt_toolkit, pydantic, starlette.background, uvicorn, zmq  # noqa: F401, E401
    print("mini-sglang's server imports: ok")
except Exception as e:
    print(f"mini-sglang's server imports: FAILED: {type(e).__name__}: {e}")
EOF

OURS_PID=
MINI_PID=
OURS_CHILDREN=
kill_group() {  # pid: SIGTERM its process group, then SIGKILL after $2 s
  local pid=$1 grace=${2:-10}
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for _ in $(seq "$grace"); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  log "process group $pid still there after ${grace}s: SIGKILL"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
}
stop_ours() {
  [ -n "$OURS_PID" ] || return 0
  log "stopping our engine (SIGTERM to the launcher $OURS_PID)"
  kill -TERM "$OURS_PID" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$OURS_PID" 2>/dev/null || break; sleep 1; done
  if kill -0 "$OURS_PID" 2>/dev/null; then
    log "the launcher did not stop within 30 s: SIGKILL to it and its children's groups ($OURS_CHILDREN)"
    kill -KILL -- "-$OURS_PID" 2>/dev/null
  fi
  for c in $OURS_CHILDREN; do kill -0 "$c" 2>/dev/null && kill -KILL -- "-$c" 2>/dev/null; done
  wait "$OURS_PID" 2>/dev/null
  log "our launcher exited with $?"
  OURS_PID=
}
stop_mini() {
  [ -n "$MINI_PID" ] || return 0
  log "stopping mini-sglang (process group $MINI_PID)"
  kill_group "$MINI_PID" 10
  wait "$MINI_PID" 2>/dev/null
  MINI_PID=
}
servers_log() {  # the head and tail of each server's log, into one file
  {
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      echo "======== $f: $(wc -l <"$f") lines; the first 80 ========"
      head -n 80 "$f"
      echo "======== $f: the last 400 ========"
      tail -n 400 "$f"
    done
  } >"$OUT/http_servers.log" 2>&1
}
combine() {  # label server: every client run of one server, by part, into $OUT/http_<label>.json
  python3 - "$1" "$2" "$RES" "$OUT/http_$1.json" <<'EOF'
import glob, json, os, subprocess, sys, time
label, server, res, out = sys.argv[1:]
parts = {}
for path in sorted(glob.glob(os.path.join(res, f"{label}__*.json"))):
    part = os.path.basename(path)[len(label) + 2 : -len(".json")]
    text = open(path).read()
    try:
        parts[part] = json.loads(text)
    except ValueError:  # JSON lines, or a run cut short
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append({"unparsed": line[:2000]})
        parts[part] = rows
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20).stdout.strip()
except Exception as e:
    gpu = repr(e)
doc = {"label": label, "server": server, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
       "gpu": gpu, "parts": parts}
json.dump(doc, open(out, "w"), indent=1)
print(f"[http_bench] wrote {out}: parts {sorted(parts)}")
EOF
}
cleanup() {
  stop_ours
  stop_mini
  servers_log
  log "done (exit handler)"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

wait_http() {  # url timeout_s pid name: until GET url answers 200, pid dies, or the time is up
  python3 - "$@" <<'EOF'
import os, sys, time, urllib.request
url, timeout, pid, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t0 = time.monotonic(); last = 0.0; status = None
while time.monotonic() - t0 < timeout:
    try:
        os.kill(pid, 0)
    except OSError:
        print(f"[http_bench] {name} (pid {pid}) exited before answering {url}", flush=True); sys.exit(2)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status = r.status
            if status == 200:
                print(f"[http_bench] {name} answered {url} after {time.monotonic() - t0:.1f} s: "
                      f"{r.read(300).decode(errors='replace')}", flush=True)
                sys.exit(0)
    except Exception as e:
        status = getattr(e, "code", None) or type(e).__name__
    if time.monotonic() - last >= 20:
        last = time.monotonic()
        print(f"[http_bench] waiting for {name}: {time.monotonic() - t0:.0f} s, last answer {status}", flush=True)
    time.sleep(1.0)
print(f"[http_bench] {name} did not answer {url} within {timeout:.0f} s (last: {status})", flush=True)
sys.exit(1)
EOF
}

# One run of the benchmark client. label base part deadline cap [flags...]: bounded by cap and by the deadline
# (seconds since the epoch), skipped when less than 20 s are left.
client() {
  local label=$1 base=$2 part=$3 deadline=$4 cap=$5
  shift 5
  local now tmo
  now=$(date +%s)
  tmo=$((deadline - now))
  [ "$tmo" -gt "$cap" ] && tmo=$cap
  if [ "$tmo" -lt 20 ]; then
    log "SKIP $label $part: ${tmo}s left before this server's deadline"
    return 0
  fi
  local cmd=(python3 -m minisgl.bench serve --base-url "$base" --endpoint chat --workload random --ignore-eos
    --processes 8 --no-progress --label "$label" --out "$RES/${label}__${part}.json" "$@")
  # shellcheck disable=SC2206
  [ -n "${BENCH_EXTRA:-}" ] && cmd+=($BENCH_EXTRA)
  log "RUN $label $part (timeout ${tmo}s): ${cmd[*]}"
  local t
  t=$(date +%s)
  PYTHONPATH=$OUR_PYTHONPATH timeout -k 5 "$tmo" "${cmd[@]}"
  local rc=$?
  log "END $label $part: rc=$rc in $(($(date +%s) - t))s"
  [ "$rc" -eq 124 ] && log "TIMEOUT $label $part"
  return 0
}
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
scrape() {  # part: our /metrics after a client part, kept beside its results (the engine's own step times)
  python3 - "$1" "$RES/minisgl__metrics_$1.json" <<'EOF2'
import json, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=10).read().decode()
keep = [l for l in text.splitlines() if not l.startswith("#") and "_bucket" not in l]
json.dump({"part": sys.argv[1], "metrics": keep}, open(sys.argv[2], "w"))
EOF2
}
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
  [ "$l" = minisgl ] && m=scrape && $m warmup
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
  has rate && client "$l" "$b" rate "$d" 90 --input-len 128 --output-len 128 --request-rate "${RATES:-4,16,64,256}" \
    --num-prompts "${RATE_PROMPTS:-64}" $r && $m rate
  return 0
}

# ---------------------------------------------------------------------------------------------------- model
log "building the random-weight model in $MODEL (seed 0, bf16) from .gpu-model"
ls -la .gpu-model .gpu-bin 2>&1 | sed 's/^/[files] /'
timeout -k 5 120 python3 - "$ROOT" "$MODEL" <<'EOF'
import shutil, sys, time
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
t = time.time()
try:  # the same weights as the other GPU runs (minisgl bench offline, scripts/bench_gpu.py)
    from minisgl.bench.random_model import make_model

    make_model(out, seed=0, init_std=0.02)
    how = "minisgl.bench.random_model.make_model"
except ImportError as e:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"[http_bench] make_model not importable ({e}): building from .gpu-model/config.json")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / ".gpu-model"))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    how = "from_config(.gpu-model)"
for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt"):
    if (root / ".gpu-model" / name).exists():
        shutil.copy(root / ".gpu-model" / name, out / name)
print(f"[http_bench] model built by {how} in {time.time() - t:.1f} s: {sorted(p.name for p in out.iterdir())}")
EOF
rc=$?
if [ "$rc" -ne 0 ] || [ ! -f "$MODEL/config.json" ]; then
  log "FATAL: building the model failed (rc=$rc)"
  exit 1
fi

# ---------------------------------------------------------------------------------------------- ours
if [ "${SKIP_CEILING:-0}" != 1 ]; then
  ceiling
  combine ceiling "the client against instant_server: our HTTP front end over an engine that costs nothing"
fi
if [ "${SKIP_OURS:-0}" != 1 ]; then
  chmod +x .gpu-bin/minisgl-sched 2>/dev/null
  OURS_DEADLINE=$((T0 + OURS_SHARE))
  log "starting our engine"
  setsid python3 -m minisgl.launch --model "$MODEL" --sched-bin .gpu-bin/minisgl-sched \
    --http 127.0.0.1:8000 --listen tcp://127.0.0.1:5557 --log-level info >"$LOGS/ours.log" 2>&1 &
  OURS_PID=$!
  log "our launcher: pid $OURS_PID"
  wait_tmo=$((OURS_DEADLINE - $(date +%s) - 60))
  [ "$wait_tmo" -gt 240 ] && wait_tmo=240
  if wait_http http://127.0.0.1:8000/health "$wait_tmo" "$OURS_PID" "our engine"; then
    OURS_CHILDREN=$(ps -o pid= --ppid "$OURS_PID" 2>/dev/null | tr '\n' ' ')
    log "our engine is up; the launcher's children: $OURS_CHILDREN"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1 | sed 's/^/[gpu] used: /'
    python3 -c "import urllib.request as u; print('[http_bench] /v1/models:', u.urlopen('http://127.0.0.1:8000/v1/models').read().decode()[:300])"
    client_runs minisgl http://127.0.0.1:8000 "$OURS_DEADLINE"
    engine_runs "$OURS_DEADLINE"
  else
    log "FAILED: our engine did not come up; the last lines of its log:"
    tail -n 40 "$LOGS/ours.log"
  fi
  stop_ours
  combine minisgl "ours: minisgl.launch + minisgl-sched (release), page size 16, CUDA graphs, overlap"
fi

# ---------------------------------------------------------------------------------------------- mini-sglang
if [ "${SKIP_MINI:-0}" != 1 ]; then
  log "waiting for the GPU memory to be released"
  for _ in $(seq 30); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$used" ] && [ "$used" -lt 4000 ] && break
    sleep 1
  done
  log "GPU memory used: ${used:-?} MiB"
  MINI_DEADLINE=$((T0 + BUDGET - 20))
  log "starting mini-sglang's server"
  # Its package is also called minisgl: its python/ first, and not our worker_py.
  MINI_PYTHONPATH=$ROOT/.peers/mini-sglang/python:/tmp/site
  setsid env PYTHONPATH="$MINI_PYTHONPATH" MINISGL_FLASHINFER_USE_TENSOR_CORES=1 \
    python3 -m minisgl --model "$MODEL" --dummy-weight --attn "fi" --host 127.0.0.1 --port 1919 \
    --page-size 1 --cuda-graph-max-bs 256 --max-seq-len-override 4096 >"$LOGS/mini-sglang.log" 2>&1 &
  MINI_PID=$!
  log "mini-sglang: pid (and process group) $MINI_PID"
  wait_tmo=$((MINI_DEADLINE - $(date +%s) - 60))
  [ "$wait_tmo" -gt 300 ] && wait_tmo=300
  # It starts uvicorn only once its scheduler and tokenizer are ready, so any answer means ready.
  if wait_http http://127.0.0.1:1919/v1/models "$wait_tmo" "$MINI_PID" "mini-sglang"; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1 | sed 's/^/[gpu] used: /'
    client_runs mini-sglang http://127.0.0.1:1919 "$MINI_DEADLINE"
  else
    log "FAILED: mini-sglang did not come up; the last lines of its log:"
    tail -n 40 "$LOGS/mini-sglang.log"
  fi
  stop_mini
  combine mini-sglang "mini-sglang 20fcd7f: python -m minisgl --dummy-weight --attn fi, page size 1, graphs <= 256"
fi

servers_log
log "finished in $(($(date +%s) - T0)) s"
ls -la "$OUT"
