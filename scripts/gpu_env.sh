#!/usr/bin/env bash
# Prepares a bare GPU machine (the `device` tool's H200) to run minisgl from this checkout, then runs "$@".
# The wheels come from .whl/ (../shared/gpu/fetch-wheels.sh puts them there, git-ignored),
# and FlashInfer's JIT build (about 80 s on a bare machine) is restored from .whl/ficache.tgz when present.
# After the command, the JIT build is packed into $OUT/ficache.tgz: copy it to .whl/ to skip the next build.
#
# Triton's compiled kernels travel the same way, in .whl/tritoncache.tgz and $OUT/tritoncache.tgz.
#   run(command="bash scripts/gpu_env.sh python3 scripts/bench_gpu.py --out $OUT/bench.json", carry=[".whl"])
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker_py:${PYTHONPATH:-} MAX_JOBS=16 PYTHONUNBUFFERED=1 \
  FLASHINFER_WORKSPACE_BASE=/tmp/fiws TRITON_CACHE_DIR=/tmp/tritoncache
mkdir -p /tmp/tritoncache
[ -f .whl/tritoncache.tgz ] && tar xzf .whl/tritoncache.tgz -C /tmp/tritoncache
if [ -f .whl/ficache.tgz ]; then
  mkdir -p /tmp/site/flashinfer/data/aot && tar xzf .whl/ficache.tgz -C /tmp/site/flashinfer/data/aot
  echo "[gpu_env] restored FlashInfer's JIT build" >&2
fi
# bench_carry.sh gzips the tokenizer to leave room in the 64 MiB a device call carries.
if [ -f .gpu-model/tokenizer.json.gz ] && [ ! -f .gpu-model/tokenizer.json ]; then
  gunzip -k .gpu-model/tokenizer.json.gz
fi
"$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d /tmp/fiws ]; then
  rm -rf /tmp/aot && mkdir -p /tmp/aot
  find /tmp/fiws -name '*.so' | while read -r f; do n=$(basename "$f" .so); mkdir -p "/tmp/aot/$n" && cp "$f" "/tmp/aot/$n/"; done
  # Only when something was built: a run that found everything restored must not hand back an empty cache.
  [ -n "$(ls /tmp/aot)" ] && tar czf "$OUT/ficache.tgz" -C /tmp/aot . 2>/dev/null
fi
[ -n "${OUT:-}" ] && tar czf "$OUT/tritoncache.tgz" -C /tmp/tritoncache . 2>/dev/null
exit $rc
