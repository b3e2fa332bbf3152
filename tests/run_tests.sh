#!/usr/bin/env bash
# Runs the test suite with the local SLURM test cluster up (started here, stopped on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
if [ -x tests/slurm/local_cluster.sh ] || [ -f tests/slurm/local_cluster.sh ]; then
  if bash tests/slurm/local_cluster.sh start; then
    eval "$(bash tests/slurm/local_cluster.sh env)"
    trap 'bash tests/slurm/local_cluster.sh stop || true' EXIT
  else
    echo "warning: the local SLURM cluster did not start; SLURM tests will be skipped" >&2
  fi
fi
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
