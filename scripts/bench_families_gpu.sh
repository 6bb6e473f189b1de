#!/usr/bin/env bash
# Issue 8 on the H200: each served family's correctness against HF transformers on the same random weights
# and its decode step times (scripts/bench_gpu.py --shape), and Qwen2.5-0.5B's step times before and after
# a change, alternated in one run.
#   run(command="bash scripts/gpu_env.sh bash scripts/bench_families_gpu.sh", carry=[".whl", ".peers"])
# PART: check (correctness), time (step times) or all. SHAPES: bench_gpu.py's --shape names. OLD: a copy of
# the code to compare Qwen2.5 against (git archive REV worker_py scripts | tar x -C .peers/minisgl-old), with
# OLD_CONFIG its bench_gpu.py configuration; skipped when absent.
set -uo pipefail
out=${OUT:-/tmp/bench-families}
mkdir -p "$out"
part=${PART:-all}
shapes=${SHAPES:-qwen3-0.6b llama3.2-1b qwen3-moe-4l}
batches=${BATCHES:-1,16,256}
old=${OLD:-.peers/minisgl-old}
old_config=${OLD_CONFIG:-flashinfer+graphs+fused+triton_decode+small_m}
steps=${STEPS:+--steps $STEPS}
bench() { echo "== bench_gpu $*" >&2; python3 "$@" --profile-batches "" 2>&1 | grep -v Warning; }

if [[ $part != time ]]; then
  for s in $shapes; do
    bench scripts/bench_gpu.py --shape "$s" --model-dir "/tmp/model-$s" --configs torch,default \
      --skip-decode --out "$out/check-$s.json"
  done
fi
if [[ $part != check ]]; then
  q=/tmp/model-qwen2.5-0.5b
  for round in 1 2; do
    if [[ -d $old ]]; then
      bench "$old/scripts/bench_gpu.py" --model-dir $q --configs "$old_config" --skip-correctness \
        --batches "$batches" $steps --out "$out/qwen2.5-old-$round.json"
    fi
    bench scripts/bench_gpu.py --model-dir $q --configs default --skip-correctness --batches "$batches" $steps \
      --out "$out/qwen2.5-new-$round.json"
  done
  for s in $shapes; do
    bench scripts/bench_gpu.py --shape "$s" --model-dir "/tmp/model-$s" --configs default --skip-correctness \
      --batches "$batches" $steps --out "$out/time-$s.json"
  done
fi
