"""Where the ranks meet: MASTER_ADDR and MASTER_PORT for `init_process_group`, derived from the environment.

torchrun and submitit export both variables and always win. A plain `srun python -m dist_train.main`
exports neither, so every rank derives the same pair from what SLURM gives each task: the address is
the first host of the step's node list (where task 0 runs, with SLURM's block and cyclic
distributions), the port a function of the job and step ids, so two jobs (or two steps of one
allocation) sharing a node do not meet on each other's port. A lone process that still needs a group
(DeepSpeed) takes a free port. Everything here reads a mapping and returns values, so it is tested
without a process group.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from collections.abc import Mapping

from torch.distributed.elastic.utils.distributed import get_free_port

LOCAL_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 29500
"""torch's own default, kept for ranks that come from RANK/WORLD_SIZE without a launcher's port."""
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 17000
"""SLURM ports lie in [15000, 31999]: above the well-known and common service ports, below Linux's
ephemeral range (32768 and up), so no outgoing connection of another program holds the port by chance."""
STEP_STRIDE = 31
"""Job ids are multiplied by this (coprime with the span) before the step id is added: consecutive jobs
stay 31 ports apart, so steps 0-30 of one job never take the port of a neighbouring job's first step."""
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
"""The step's nodes first: in `srun -N2` inside a larger allocation, task 0 runs on the step's first node."""
SCONTROL_TIMEOUT_S = 10

_RANGE = r"\d+(?:-\d+)?"
_HOST = rf"(?:[^,\[\]\s]|\[{_RANGE}(?:,{_RANGE})*\])+"
_NODELIST = re.compile(rf"{_HOST}(?:,{_HOST})*")


def master_env(environ: Mapping[str, str], world_size: int) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for this process; a value a launcher already exported is kept as it is."""
    address, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if world_size > 1 and launched_by_slurm(environ):
        address = address or slurm_master_address(environ)
        port = port or slurm_master_port(environ)
    return {"MASTER_ADDR": address or LOCAL_ADDRESS,
            "MASTER_PORT": port or str(DEFAULT_PORT if world_size > 1 else get_free_port())}


def launched_by_slurm(environ: Mapping[str, str]) -> bool:
    """True when the rank comes from SLURM's task variables, i.e. no torchrun variables are present."""
    torchrun = "RANK" in environ and "WORLD_SIZE" in environ
    return not torchrun and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ


def slurm_master_address(environ: Mapping[str, str]) -> str | None:
    """The first host of the step's (else the job's) node list; None when SLURM gave no list."""
    nodelist = next((environ[name] for name in NODELIST_VARIABLES if environ.get(name)), None)
    return first_host(nodelist) if nodelist else None


def slurm_master_port(environ: Mapping[str, str]) -> str | None:
    """SLURM_PORT_BASE + (31 * job id + step id) mod SLURM_PORT_SPAN; None when SLURM gave no job id."""
    job_id = environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        return None
    step_id = environ.get("SLURM_STEP_ID", "0")
    step = int(step_id) if step_id.isdigit() else 0
    return str(SLURM_PORT_BASE + (STEP_STRIDE * int(job_id) + step) % SLURM_PORT_SPAN)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list, by `scontrol show hostnames` where it runs, else by our parser."""
    return (_scontrol_hostnames(nodelist) or expand_nodelist(nodelist))[0]


def _scontrol_hostnames(nodelist: str) -> list[str]:
    """SLURM's own expansion (the authority on its syntax); [] when scontrol is missing or fails."""
    if shutil.which("scontrol") is None:
        return []
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return result.stdout.split() if result.returncode == 0 else []


def expand_nodelist(nodelist: str) -> list[str]:
    """Every host of a compact SLURM host list: `gpu[017-018,020]`, `a[1-2],b3`, `rack[1-2]-n[1-2]`.

    Numbers keep the zero padding of a range's lower bound, as SLURM writes them (`[08-10]` is 08, 09, 10).
    """
    if not _NODELIST.fullmatch(nodelist):
        raise ValueError(f"{nodelist!r} is not a SLURM host list (such as 'gpu[017-018,020]'): "
                         "export MASTER_ADDR with the hostname of the node of rank 0")
    hosts: list[str] = []
    for item in re.findall(_HOST, nodelist):
        pieces = re.split(r"\[([^\]]*)\]", item)  # literal, ranges, literal, ranges, ..., literal
        choices = [[piece] if index % 2 == 0 else _expand_ranges(piece, nodelist) for index, piece in enumerate(pieces)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    numbers: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if int(high or low) < int(low):
            raise ValueError(f"{nodelist!r}: the range {part} runs backwards")
        numbers += [f"{number:0{len(low)}d}" for number in range(int(low), int(high or low) + 1)]
    return numbers
