"""Test helper: runs a kernel check script in a fresh interpreter, under Triton's interpreter or compiled.

A subprocess because Triton picks the interpreter when kernels are defined (at import), from TRITON_INTERPRET;
the script prints "ok" as its last line when every check passed.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_kernel_check(script: str, interpret: bool) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"} if interpret else dict(os.environ)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
