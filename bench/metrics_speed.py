"""How long the AIROGS metrics and the prediction gather take at evaluation scale.

α and β on 1,000,000 scores are timed beside sklearn's own `roc_auc_score` on the same data (our
checks and β's ROC sweep should cost about one sklearn call each). Then 100,000 (key, label,
score) triples are gathered from 2 gloo ranks to rank 0 with `dist.gather_object`, the way the
loop collects validation predictions. Prints the figures and appends a dated row to
bench/RESULTS.md.

    python bench/metrics_speed.py
"""

from __future__ import annotations

import time

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from common import append_row, free_port
from sklearn.metrics import roc_auc_score

from dist_train.evaluation import metrics

SCORES = 1_000_000
POSITIVE_RATE = 0.02
TRIPLES = 100_000
RANKS = 2
REPEATS = 3


def best_of(function, *args) -> float:
    """Fastest of REPEATS calls, in seconds (the least disturbed by the other processes on the machine)."""
    timings = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        function(*args)
        timings.append(time.perf_counter() - start)
    return min(timings)


def time_metrics() -> dict[str, float]:
    rng = np.random.default_rng(0)
    labels = (rng.random(SCORES) < POSITIVE_RATE).astype(np.int64)
    scores = np.round(rng.normal(size=SCORES) + 1.2 * labels, 4)
    return {
        "sklearn roc_auc_score": best_of(roc_auc_score, labels, scores),
        "sklearn roc_auc_score max_fpr=0.1": best_of(lambda y, s: roc_auc_score(y, s, max_fpr=0.1), labels, scores),
        "airogs_alpha": best_of(metrics.airogs_alpha, labels, scores),
        "airogs_beta": best_of(metrics.airogs_beta, labels, scores),
        "compute_all": best_of(metrics.compute_all, labels, scores),
    }


def gather_worker(rank: int, port: int, queue) -> None:
    """One rank: build its share of triples, gather them to rank 0, report the time on rank 0."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    rng = np.random.default_rng(rank)
    share = TRIPLES // RANKS
    triples = [(f"TRAIN{rank * share + index:06d}", int(label), float(score))
               for index, (label, score) in enumerate(zip(rng.random(share) < POSITIVE_RATE, rng.random(share)))]
    gathered = [None] * RANKS if rank == 0 else None
    dist.barrier()
    start = time.perf_counter()
    dist.gather_object(triples, gathered, dst=0)
    elapsed = time.perf_counter() - start
    if rank == 0:
        queue.put((elapsed, sum(len(part) for part in gathered)))
    dist.destroy_process_group()


def time_gather() -> tuple[float, int]:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(gather_worker, args=(free_port(), queue), nprocs=RANKS, start_method="spawn")
    return queue.get()


def main() -> None:
    timings = time_metrics()
    for name, seconds in timings.items():
        print(f"{name:<36} {seconds * 1000:8.1f} ms  ({SCORES:,} scores)")
    gather_seconds, gathered = time_gather()
    print(f"{'gather_object, 2 gloo ranks':<36} {gather_seconds * 1000:8.1f} ms  ({gathered:,} triples)")
    figures = (f"{SCORES:,} scores: sklearn AUC {timings['sklearn roc_auc_score'] * 1000:.0f} ms, "
               f"sklearn max_fpr {timings['sklearn roc_auc_score max_fpr=0.1'] * 1000:.0f} ms, "
               f"α {timings['airogs_alpha'] * 1000:.0f} ms, β {timings['airogs_beta'] * 1000:.0f} ms, "
               f"compute_all {timings['compute_all'] * 1000:.0f} ms; "
               f"gather_object {gathered:,} triples / {RANKS} gloo ranks {gather_seconds * 1000:.0f} ms")
    append_row("metrics_speed", figures)


if __name__ == "__main__":
    main()
