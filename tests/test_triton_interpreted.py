"""Triton kernel tests that are quick under Triton's CPU interpreter, run on a machine without a
GPU (CI): each file in a pytest subprocess with TRITON_INTERPRET=1, which Triton reads when a
kernel is defined, so it cannot be switched on inside this process once shardline's kernel
modules are imported. Skipped where Triton is not installed, on a CUDA machine (the files run
on the GPU there) and where this pytest already interprets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED_FILES = ["tests/test_triton_fp8_gemm.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel tests run on the GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
@pytest.mark.parametrize("path", INTERPRETED_FILES)
def test_kernel_tests_pass_under_the_interpreter(path: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
