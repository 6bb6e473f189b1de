# Shared by the GPU benchmark scripts that start servers (bench_http_gpu.sh, bench_prefix_gpu.sh): sourced, not
# run. The caller sets, before sourcing: BENCH_TAG (the log prefix), OUT (what comes back), and may set RES (the
# client's results, default /tmp/$BENCH_TAG/res), LOGS (the servers' logs, /tmp/$BENCH_TAG/logs), MODEL
# (/tmp/model); then calls bench_init LOGFILE, which starts the clock (T0) and sends all output to $OUT/LOGFILE.
#
# Environment, for every script that sources this:
#   BENCH_DEVICE=cpu   a dry run on a machine without a GPU: a tiny random model (the real vocabulary), our engine
#                      with --device cpu; what needs the GPU (nvidia-smi, bf16 weights) is left out
#   SCHED_BIN          our scheduler binary (default .gpu-bin/minisgl-sched, else target/release/minisgl-sched)
#   TOKENIZER_DIR      the tokenizer files (default .gpu-model, else models/Qwen2.5-Coder-0.5B-Instruct)
#   MINI_PEER          mini-sglang's python/ directory (default .peers/mini-sglang/python)
#   MINI_CMD           how to start mini-sglang's server: `sh -c "$MINI_CMD FLAGS"` (FLAGS: those of the start)
#                      in a process group of its own, with PYTHONPATH=$MINI_PEER:/tmp/site (default: its server
#                      on :$MINI_PORT, 1919, dummy weights, FlashInfer, page size 1, graphs up to 256); a CPU dry
#                      run sets it to the stand-in server: "exec python3 -m minisgl.bench.standin --port 1919"
# shellcheck shell=bash

ROOT=$PWD
BENCH_TAG=${BENCH_TAG:-bench}
RES=${RES:-/tmp/$BENCH_TAG/res}
LOGS=${LOGS:-/tmp/$BENCH_TAG/logs}
MODEL=${MODEL:-/tmp/model}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
OURS_HTTP=${OURS_HTTP:-127.0.0.1:8000}
OURS_PID=
OURS_CHILDREN=
MINI_PID=
# The python3 of the device, without mini-sglang on its path: our package and the client.
OUR_PYTHONPATH=${PYTHONPATH:-}
if [ -z "${SCHED_BIN:-}" ]; then
  SCHED_BIN=.gpu-bin/minisgl-sched
  [ -e "$SCHED_BIN" ] || SCHED_BIN=target/release/minisgl-sched
fi
case "$SCHED_BIN" in /*) ;; *) SCHED_BIN=$ROOT/$SCHED_BIN ;; esac
if [ -z "${TOKENIZER_DIR:-}" ]; then
  TOKENIZER_DIR=.gpu-model
  [ -f "$TOKENIZER_DIR/tokenizer.json" ] || TOKENIZER_DIR=models/Qwen2.5-Coder-0.5B-Instruct
fi
MINI_PEER=${MINI_PEER:-$ROOT/.peers/mini-sglang/python}
MINI_PORT=${MINI_PORT:-1919}
MINI_CMD=${MINI_CMD:-exec python3 -m minisgl --model $MODEL --dummy-weight --attn fi --host 127.0.0.1 \
--port $MINI_PORT --page-size 1 --cuda-graph-max-bs 256 --max-seq-len-override 4096}

log() { printf '[%s %s +%ss] %s\n' "$BENCH_TAG" "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*"; }
left() { echo $((T0 + BUDGET - $(date +%s))); }
on_gpu() { [ "$BENCH_DEVICE" != cpu ]; }
gpu_query() {  # nvidia-smi --query-gpu=$1 (nothing on a CPU dry run)
  on_gpu && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu="$1" --format=csv,noheader "${@:2}" 2>&1
}

bench_init() {  # logfile: output to $OUT/logfile too, the clock, the open files limit, the GPU, the versions
  mkdir -p "$OUT" "$RES" "$LOGS"
  exec > >(tee -a "$OUT/$1") 2>&1
  T0=$(date +%s)
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
  log "open files limit: $(ulimit -n) (1024 streams need more than the usual 1024)"
  gpu_query name,memory.used,memory.total,driver_version | sed 's/^/[gpu] /'
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
}

kill_group() {  # pid: SIGTERM its process group, then SIGKILL after $2 s
  local pid=$1 grace=${2:-10}
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for _ in $(seq "$grace"); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
  log "process group $pid still there after ${grace}s: SIGKILL"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
}

wait_http() {  # url timeout_s pid name: until GET url answers 200, pid dies, or the time is up
  python3 - "$BENCH_TAG" "$@" <<'EOF'
import os, sys, time, urllib.request
tag, url, timeout, pid, name = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t0 = time.monotonic(); last = 0.0; status = None
while time.monotonic() - t0 < timeout:
    try:
        os.kill(pid, 0)
    except OSError:
        print(f"[{tag}] {name} (pid {pid}) exited before answering {url}", flush=True); sys.exit(2)
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            status = r.status
            if status == 200:
                print(f"[{tag}] {name} answered {url} after {time.monotonic() - t0:.1f} s: "
                      f"{r.read(300).decode(errors='replace')}", flush=True)
                sys.exit(0)
    except Exception as e:
        status = getattr(e, "code", None) or type(e).__name__
    if time.monotonic() - last >= 20:
        last = time.monotonic()
        print(f"[{tag}] waiting for {name}: {time.monotonic() - t0:.0f} s, last answer {status}", flush=True)
    time.sleep(1.0)
print(f"[{tag}] {name} did not answer {url} within {timeout:.0f} s (last: {status})", flush=True)
sys.exit(1)
EOF
}

wait_gpu_free() {  # until the GPU's memory is (almost) free again, 30 s at most
  on_gpu || return 0
  local used=
  for _ in $(seq 30); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -n "$used" ] && [ "$used" -lt 4000 ] 2>/dev/null && break
    sleep 1
  done
  log "GPU memory used: ${used:-?} MiB"
}

# ---------------------------------------------------------------------------------------------- the model
build_model() {  # Qwen2.5-0.5B's shapes, random bf16 weights (seed 0), in $MODEL; a tiny one with BENCH_DEVICE=cpu
  log "building the random-weight model in $MODEL ($BENCH_DEVICE) with the tokenizer of $TOKENIZER_DIR"
  # shellcheck disable=SC2012
  ls -la "$TOKENIZER_DIR" .gpu-bin 2>&1 | sed 's/^/[files] /'
  rm -rf "$MODEL"
  timeout -k 5 "${1:-120}" python3 - "$TOKENIZER_DIR" "$MODEL" "$BENCH_DEVICE" "$BENCH_TAG" <<'EOF'
import shutil, sys, time
from pathlib import Path
tok, out, device, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
t = time.time()
try:  # the same weights as the other GPU runs (minisgl bench offline, scripts/bench_gpu.py)
    from minisgl.bench import random_model

    if device == "cpu":
        random_model.make_tiny_model(out)
        how = "minisgl.bench.random_model.make_tiny_model (CPU dry run)"
    else:
        random_model.make_model(out, seed=0, init_std=0.02)
        how = "minisgl.bench.random_model.make_model"
except ImportError as e:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"[{tag}] minisgl.bench.random_model not importable ({e}): building from {tok}/config.json")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tok))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    how = f"from_config({tok})"
for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt"):
    if (tok / name).exists():
        shutil.copy(tok / name, out / name)
print(f"[{tag}] model built by {how} in {time.time() - t:.1f} s: {sorted(p.name for p in out.iterdir())}")
EOF
  local rc=$?
  if [ "$rc" -ne 0 ] || [ ! -f "$MODEL/config.json" ]; then
    log "FATAL: building the model failed (rc=$rc)"
    return 1
  fi
}

# ---------------------------------------------------------------------------------------------- our server
start_ours() {  # name wait_s [flags...]: our engine on $OURS_HTTP, in its own session; 0 once /health says 200
  local name=$1 wait_s=$2
  shift 2
  chmod +x "$SCHED_BIN" 2>/dev/null
  local dev=()
  on_gpu || dev=(--device cpu)
  log "starting our engine ($name): ${dev[*]} $*"
  setsid python3 -m minisgl.launch --model "$MODEL" --sched-bin "$SCHED_BIN" --http "$OURS_HTTP" \
    --listen tcp://127.0.0.1:5557 --log-level info "${dev[@]}" "$@" >"$LOGS/ours_$name.log" 2>&1 &
  OURS_PID=$!
  log "our launcher: pid $OURS_PID"
  if wait_http "http://$OURS_HTTP/health" "$wait_s" "$OURS_PID" "our engine ($name)"; then
    OURS_CHILDREN=$(ps -o pid= --ppid "$OURS_PID" 2>/dev/null | tr '\n' ' ')
    log "our engine is up; the launcher's children: $OURS_CHILDREN"
    gpu_query memory.used | sed 's/^/[gpu] used: /'
    python3 -c "import urllib.request as u; print('[$BENCH_TAG] /v1/models:', u.urlopen('http://$OURS_HTTP/v1/models').read().decode()[:300])"
    return 0
  fi
  log "FAILED: our engine ($name) did not come up; the last lines of its log:"
  tail -n 40 "$LOGS/ours_$name.log"
  return 1
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

scrape() {  # file: our /metrics now, without the histogram buckets (the engine's own step times), into $RES
  python3 - "$1" "http://$OURS_HTTP/metrics" <<'EOF' || log "scraping /metrics into $1 failed"
import json, sys, urllib.request
text = urllib.request.urlopen(sys.argv[2], timeout=10).read().decode()
keep = [l for l in text.splitlines() if not l.startswith("#") and "_bucket" not in l]
json.dump({"metrics": keep}, open(sys.argv[1], "w"))
EOF
}

# ---------------------------------------------------------------------------------------------- mini-sglang
start_mini() {  # name wait_s [flags...]: mini-sglang's server on :$MINI_PORT, its own process group
  local name=$1 wait_s=$2
  shift 2
  log "starting mini-sglang's server ($name): $MINI_CMD $*"
  # Its package is also called minisgl: its python/ first, and not our worker_py.
  # Qwen2.5's group size of 7 needs FlashInfer's tensor-core decode.
  setsid env PYTHONPATH="$MINI_PEER:/tmp/site" MINISGL_FLASHINFER_USE_TENSOR_CORES=1 sh -c "$MINI_CMD $*" \
    >"$LOGS/mini_$name.log" 2>&1 &
  MINI_PID=$!
  log "mini-sglang: pid (and process group) $MINI_PID"
  # It starts uvicorn only once its scheduler and tokenizer are ready, so any answer means ready.
  if wait_http "http://127.0.0.1:$MINI_PORT/v1/models" "$wait_s" "$MINI_PID" "mini-sglang ($name)"; then
    gpu_query memory.used | sed 's/^/[gpu] used: /'
    return 0
  fi
  log "FAILED: mini-sglang ($name) did not come up; the last lines of its log:"
  tail -n 40 "$LOGS/mini_$name.log"
  return 1
}

stop_mini() {
  [ -n "$MINI_PID" ] || return 0
  log "stopping mini-sglang (process group $MINI_PID)"
  kill_group "$MINI_PID" 10
  wait "$MINI_PID" 2>/dev/null
  MINI_PID=
}

# ---------------------------------------------------------------------------------------------- the client
# One run of `minisgl bench serve`: label base part deadline cap [flags...], into $RES/<label>__<part>.json;
# bounded by cap and by the deadline (seconds since the epoch), skipped when less than 20 s are left.
# BENCH_EXTRA: more client flags for every run.
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
  local cmd=(python3 -m minisgl.bench serve --base-url "$base" --endpoint chat --ignore-eos
    --processes "${CLIENT_PROCESSES:-8}" --no-progress --label "$label" --out "$RES/${label}__${part}.json" "$@")
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

# ---------------------------------------------------------------------------------------------- what comes back
servers_log() {  # outfile: the head and tail of each server's log, into one file
  {
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] || continue
      echo "======== $f: $(wc -l <"$f") lines; the first 80 ========"
      head -n 80 "$f"
      echo "======== $f: the last 400 ========"
      tail -n 400 "$f"
    done
  } >"$1" 2>&1
}

combine() {  # label server outfile: every client run of one label, by part, into one JSON file
  python3 - "$1" "$2" "$RES" "$3" "$BENCH_TAG" <<'EOF'
import glob, json, os, subprocess, sys, time
label, server, res, out, tag = sys.argv[1:]
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
    gpu = f"no GPU ({type(e).__name__})"
doc = {"label": label, "server": server, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
       "gpu": gpu, "parts": parts}
json.dump(doc, open(out, "w"), indent=1)
print(f"[{tag}] wrote {out}: parts {sorted(parts)}")
EOF
}
