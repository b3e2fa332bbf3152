"""Submit training to SLURM: `python launch/submit.py --nodes 2 --config configs/airogs_v2.yaml`.

Also `--dry-run` (print the sbatch script), `--local` (same job, this machine), `--sweep k=v1,v2`,
`status RUN` and `tail RUN`. `--help` lists the options; the logic lives in `dist_train/slurm.py`
(submitting, the job) and `dist_train/submit_cli.py` (this command line).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train.submit_cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
