#!/usr/bin/env bash
# Every test that needs a GPU (they skip themselves on the development machine and in CI), in one device call:
# one pytest per file, each under a time limit so that a slow or hung file leaves the others their turn. The
# files are found, not listed: every test file that asks `torch.cuda.is_available()` or skips "needs CUDA".
# Each file's log goes to $OUT/gpu_tests/FILE.log; the summary (one line per file) is printed and kept in
# $OUT/gpu_tests/summary.txt.
#   run(command="bash scripts/gpu_env.sh bash scripts/gpu_tests.sh", carry=[".whl"])
#   GPU_TESTS="test_gpu_paths.py test_attention_triton_extend.py"   only these files, in this order
#   GPU_TEST_LIMIT=150                                               seconds per file
#   GPU_TEST_ARGS="-x"                                               more pytest arguments
#   PYTHON=python3                                                   the interpreter
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit=${GPU_TEST_LIMIT:-150}
out=${OUT:-/tmp}/gpu_tests
mkdir -p "$out"
if [ -n "${GPU_TESTS:-}" ]; then
  files=()
  for name in $GPU_TESTS; do
    found=$(ls worker_py/tests/"$name" tests/"$name" 2>/dev/null | head -1)
    files+=("${found:-$name}")
  done
else
  mapfile -t files < <(grep -lE 'cuda\.is_available|needs CUDA' worker_py/tests/test_*.py tests/test_*.py)
fi
failed=0
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "no such test file: $f" | tee -a "$out/summary.txt"; failed=1; continue; }
  log="$out/$(basename "$f" .py).log"
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$limit" "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider ${GPU_TEST_ARGS:-} "$f" >"$log" 2>&1
  rc=$?
  # 5: nothing collected, the whole file skipped (no GPU, or not the GPU it needs).
  [ $rc -eq 0 ] || [ $rc -eq 5 ] || failed=1
  line=$(grep -E ' in [0-9.]+s' "$log" | tail -1)
  [ $rc -eq 124 ] && line="timed out after ${limit} s"
  printf '%-40s rc=%-3s %4ss  %s\n' "$(basename "$f")" "$rc" "$((SECONDS - start))" "$line" | tee -a "$out/summary.txt"
done
exit $failed
