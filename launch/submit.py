"""Submit training to SLURM: `python launch/submit.py --nodes 2 --config configs/airogs_v2.yaml`.

Also `--dry-run` (print the sbatch script), `--local` (same job, this machine), `--sweep k=v1,v2`,
`status RUN` and `tail RUN`. `--help` lists the options; the logic lives in `dist_train/slurm/job.py`
(submitting, the job) and `dist_train/slurm/cli.py` (this command line).
"""

import sys

from dist_train.slurm.cli import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
