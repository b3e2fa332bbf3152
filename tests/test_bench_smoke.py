"""The GPU benchmark must be ready when a GPU is: without one it runs its CPU smoke path end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu_and_records_nothing(tmp_path):
    """bench/gpu_check.py's CPU path: gpu_throughput's parts, and DDP vs ZeRO-2 on the same batches agreeing."""
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.strip() for line in run.stdout.splitlines()]
    throughput = next(line for line in lines if line.startswith("64 px, compile off:"))
    assert "model only" in throughput and "full pipeline" in throughput and "gpu decode" in throughput, throughput
    engines = next(line for line in lines if line.startswith("engines"))
    assert "losses agree" in engines, engines
    assert results.read_bytes() == before


def test_clahe_cost_benchmark_runs_small_and_records_nothing(tmp_path):
    """bench/clahe_cost.py end to end at a toy size: both shard sets built, both epochs run, nothing appended."""
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    run = subprocess.run([sys.executable, "bench/clahe_cost.py", "--n", "8", "--raw-size", "300", "--sizes", "64",
                          "--repeats", "1", "--workers", "1", "--batch-size", "4", "--no-record",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "64 px: epoch per-epoch CLAHE" in run.stdout and "CLAHE shards" in run.stdout
    built = json.loads((tmp_path / "clahe-64" / "manifest.json").read_text())["preprocessing"]
    raw = json.loads((tmp_path / "raw-64" / "manifest.json").read_text())["preprocessing"]
    assert built["clahe"] == {"clip_limit": 2.0, "tile_grid": 8} and "clahe" not in raw
    assert results.read_bytes() == before
