"""The Triton kernels' tests, run on the CPU through Triton's interpreter: CI has no GPU, but with triton installed
(the ``dev`` extra) it runs the kernels' own code (gated-score forward and backward, the loss epilogue, causal
skipping, the pool gathers) against the same oracles the GPU runs use. TRITON_INTERPRET must be set before the
kernels are defined and would route every CPU scoring through the interpreter, so the kernel test files run in
a subprocess of their own."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_gated_score_kernel.py", "tests/test_gated_loss_kernel.py",
                "tests/test_pool_gather_kernel.py", "tests/test_train_loss.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run on the device")
def test_kernel_tests_pass_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30, summary  # the kernels ran: none skipped for want of a device
    assert "skipped" not in summary and "failed" not in summary, summary
