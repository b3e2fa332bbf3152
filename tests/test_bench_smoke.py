"""The GPU benchmark must be ready when a GPU is: without one it runs its CPU smoke path end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_its_cpu_fallback_and_records_nothing(tmp_path):
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    run = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--cpu-smoke", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "img/s" in run.stdout
    assert results.read_bytes() == before
