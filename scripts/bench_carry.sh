#!/usr/bin/env bash
# Prepares, on the development machine, the git-ignored files that the GPU benchmark scripts (bench_http_gpu.sh,
# bench_prefix_gpu.sh) take to the device with run(carry=[".whl", ".gpu-model", ".gpu-bin", ".peers"]). Run it
# right before the device call, after the last change to the scheduler: it always rebuilds the scheduler.
#   .whl/          ../shared/gpu/fetch-wheels.sh's wheels (FlashInfer 0.5.3 and its two dependencies, pyzmq), and
#                  mini-sglang's server wheels (fastapi 0.140.x, uvicorn, prompt_toolkit and what they need), for
#                  CPython 3.12 manylinux; downloaded once
#   .gpu-model/    config.json and the tokenizer files of models/Qwen2.5-Coder-0.5B-Instruct (scripts/setup),
#                  tokenizer.json gzipped (gpu_env.sh unpacks it there)
#   .gpu-bin/      minisgl-sched, a release build of the scheduler as it is now, stripped (the debug info would
#                  take most of the 64 MiB that a device call carries); instant_server too with INSTANT=1
#   .peers/mini-sglang/python   upstream mini-sglang's python/ at MINI_REV (20fcd7f) from MINI_GIT, a git directory
#                  of it (default: where the search tool's `fetch github:sgl-project/mini-sglang` puts it); kept
#                  when present
# Each is added to .git/info/exclude, so that none is ever committed. Prints the sizes at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
say() { printf '[bench_carry] %s\n' "$*" >&2; }
for d in /.whl/ /.gpu-model/ /.gpu-bin/ /.peers/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python

# ---------------------------------------------------------------------------------------------- wheels
mkdir -p .whl
if ! ls .whl/flashinfer_python-*.whl >/dev/null 2>&1; then
  say "FlashInfer, its dependencies and pyzmq into .whl (../shared/gpu/fetch-wheels.sh)"
  PATH=$(dirname "$(readlink -f "$py")"):$PATH bash "$root/../shared/gpu/fetch-wheels.sh"
fi
if ! ls .whl/fastapi-*.whl >/dev/null 2>&1; then
  say "mini-sglang's server wheels into .whl"
  # fastapi 0.140.x: later ones need opentelemetry-api. The dependencies come along, as wheels for the device.
  "$py" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "fastapi==0.140.*" uvicorn prompt_toolkit
fi

# ---------------------------------------------------------------------------------------------- tokenizer
src=models/Qwen2.5-Coder-0.5B-Instruct
[ -f "$src/tokenizer.json" ] || { say "no $src: run scripts/setup first"; exit 1; }
mkdir -p .gpu-model
for f in config.json tokenizer.json tokenizer_config.json generation_config.json vocab.json merges.txt; do
  [ -f "$src/$f" ] && cp "$src/$f" .gpu-model/
done
# 11 MB that compress to 2: scripts/gpu_env.sh unpacks it on the device.
gzip -9 -f .gpu-model/tokenizer.json

# ---------------------------------------------------------------------------------------------- scheduler
say "building minisgl-sched (release) from the working tree: $(git log -1 --format='%h %s' | cut -c1-80)"
cargo build --release -q -p minisgl-scheduler --bin minisgl-sched
mkdir -p .gpu-bin
strip -o .gpu-bin/minisgl-sched target/release/minisgl-sched
if [ "${INSTANT:-0}" = 1 ]; then
  cargo build --release -q -p minisgl-scheduler --example instant_server
  strip -o .gpu-bin/instant_server target/release/examples/instant_server
fi
git log -1 --format='%H %s' >.gpu-bin/COMMIT
git status --short -- scheduler proto >>.gpu-bin/COMMIT

# ---------------------------------------------------------------------------------------------- mini-sglang
if [ ! -d .peers/mini-sglang/python/minisgl ]; then
  mini_git=${MINI_GIT:-/work/.mirror/sgl-project+mini-sglang/repo}
  if [ -d "$mini_git" ]; then
    say "mini-sglang ${MINI_REV:-20fcd7f} from $mini_git into .peers/mini-sglang"
    mkdir -p .peers/mini-sglang
    git --git-dir="$mini_git" archive "${MINI_REV:-20fcd7f}" python | tar -x -C .peers/mini-sglang
  else
    say "WARNING: no .peers/mini-sglang/python and no MINI_GIT ($mini_git): mini-sglang's parts will fail"
  fi
fi

du -sh .whl .gpu-model .gpu-bin .peers 2>/dev/null
total=$(du -sck .whl .gpu-model .gpu-bin .peers 2>/dev/null | tail -1 | cut -f1)
say "in all: $((total / 1024)) MiB (a device call carries at most 64 MiB)"
[ "$total" -le $((64 * 1024)) ] || say "WARNING: over 64 MiB: leave something out (.whl/*cache.tgz?)"
