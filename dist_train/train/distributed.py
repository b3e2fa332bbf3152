"""Everything about ranks: environment discovery, process-group init, and the few collectives the loop needs.

The rest of the code asks this module "am I rank 0?" and "gather this to rank 0"; it never touches
torch.distributed directly. Environment discovery follows timm's `world_info_from_env`: torchrun
(RANK/WORLD_SIZE), then an srun step (SLURM_PROCID/SLURM_STEP_NUM_TASKS), else a single process.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_train.errors import LaunchError
from dist_train.train import rendezvous


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def world_info_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, an srun step, or nothing (one process).

    SLURM's batch script (and an salloc shell) also has SLURM_PROCID=0 and SLURM_NTASKS, but is one process:
    read as a world of SLURM_NTASKS, it waited for ranks nobody starts. Only an srun step (SLURM_STEP_ID)
    runs a task per rank; its size is the step's (SLURM_STEP_NUM_TASKS)."""
    environ = os.environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return 0, 1, 0
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"]))
    if "SLURM_STEP_ID" not in environ and tasks > 1:
        raise LaunchError(f"SLURM allotted {tasks} tasks (SLURM_NTASKS) but this is the job's batch script, one "
                          f"process: start one rank per task with `srun python -m dist_train.main ...` (or submit "
                          f"with launch/submit.py), or ask for --ntasks=1")
    return int(environ["SLURM_PROCID"]), tasks, int(environ.get("SLURM_LOCALID", 0))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """This rank's device. The index wraps over the visible GPUs: with `--gpus-per-task=1` or `--gpu-bind`
    each task sees one GPU (index 0) whatever its local rank, and `set_device(local_rank)` would fail."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError(f"train.device is 'cuda' but this process sees no CUDA device "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run it on a GPU "
                          f"node (srun/sbatch --gpus...), or set train.device=auto, which falls back to the CPU")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_s: int = 300, always: bool = False) -> DistEnv:
    """Start the process group (NCCL on GPUs, gloo on CPU) when more than one rank runs, or `always`.

    DeepSpeed needs a group even for one process (`always`); a lone process then picks a free port. Where
    the ranks meet (a launcher's MASTER_ADDR/MASTER_PORT, else SLURM's node list and job id) is
    `rendezvous.master_env`'s choice.
    """
    rank, world_size, local_rank = world_info_from_env()
    torch_device = pick_device(device, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if (world_size > 1 or always) and not dist.is_initialized():
        os.environ.update(rendezvous.master_env(os.environ, world_size))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
        os.environ["LOCAL_RANK"] = str(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                rank=rank, world_size=world_size)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1") or 1))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                   node_rank=rank // max(local_world, 1), device=torch_device, backend=backend)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (decisions such as early stopping)."""
    if not env.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(env: DistEnv, obj: Any) -> list[Any] | None:
    """Every rank's `obj`, as a list on rank 0 and None elsewhere."""
    if not env.is_distributed:
        return [obj]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def problems_of_all(env: DistEnv, mine: list[str]) -> list[str]:
    """Every rank's problems, in rank order, on every rank: the verdict of a check whose work the ranks shared
    (each hashed or read its share of the files), so that all of them stop, or none."""
    gathered = gather_to_main(env, mine)
    return broadcast_object(env, [problem for part in gathered or [] for problem in part])


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks (counts, losses); a copy, the input is untouched."""
    total = values.detach().clone()
    if env.is_distributed:
        on_device = total.to(env.device) if env.backend == "nccl" else total
        dist.all_reduce(on_device)
        total = on_device.cpu() if env.backend == "nccl" else on_device
    return total


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; with `deterministic`, ask torch for bitwise-repeatable kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """On a GPU, cuDNN autotuning and TF32 matmuls (fixed input sizes: both pay from the first epoch)
    unless `deterministic` asks for repeatable kernels; CPU runs are left as they are."""
    if device.type != "cuda":
        return
    fast = not deterministic
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
