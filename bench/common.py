"""What every benchmark script shares: the RESULTS.md row, the machine's description, free ports.

Benchmarks are scripts, not tests: each prints its figures and appends one dated row to
bench/RESULTS.md (never rewriting it, since every benchmark shares the file).
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "| date | benchmark | machine | cores | figures |\n| --- | --- | --- | --- | --- |\n"

def load_average() -> float:
    """One-minute load average: the context a reader needs to trust a timing on a shared machine."""
    return os.getloadavg()[0]


def append_row(benchmark: str, figures: str) -> None:
    """Append one dated row; the file is shared with other benchmarks, so never rewrite it."""
    row = (f"| {datetime.date.today().isoformat()} | {benchmark} | {platform.machine()} | {os.cpu_count()} "
           f"| {figures} |\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\n" + HEADER)
    with RESULTS.open("a") as results:
        results.write(row)
    print(f"appended to {RESULTS.relative_to(ROOT)}")


def free_port() -> int:
    from torch.distributed.elastic.utils.distributed import get_free_port

    return get_free_port()


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "MISSED"
