"""Train on one node: `python launch/train.py --nproc-per-node 2 --config configs/demo.yaml [--set k=v ...]`.

With --nproc-per-node > 1 (and not already under torchrun) this validates the config, then starts
torchrun on itself; each rank runs `dist_train.main.main`. Under torchrun or SLURM it trains directly.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train.main import main, parse_args  # noqa: E402


def launch(argv: list[str]) -> int:
    nproc = 1
    if argv[:1] and argv[0].startswith("--nproc-per-node"):
        flag = argv.pop(0)
        nproc = int(flag.split("=", 1)[1]) if "=" in flag else int(argv.pop(0))
    if nproc <= 1 or "RANK" in os.environ:
        return main(argv)
    from dist_train.config import ConfigError, load_config
    from dist_train.main import preflight

    args = parse_args(argv)
    try:
        preflight(load_config(args.config, args.set), args.config or "<defaults>", args.set)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", __file__, *argv])
    except ChildFailedError as error:
        return _report_failures(error)
    return 0


def _report_failures(error) -> int:
    """One line per failed rank (torchrun printed the tracebacks above), and the first rank's exit code."""
    codes = []
    for rank, failure in sorted(error.failures.items()):
        code = failure.exitcode
        how = f"killed by signal {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        print(f"error: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
        codes.append(code)
    positive = [code for code in codes if code > 0]
    return positive[0] if positive else 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
