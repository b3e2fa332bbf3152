"""Where ranks meet and which GPU each takes, from the environment alone (issue 14, items 1 and 2).

The expected host lists are expanded by hand (and, where `scontrol` runs, by SLURM itself); the expected
ports are computed by hand from the documented rule 15000 + (31 * job id + step id) mod 17000.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from unittest import mock

import pytest
import torch

from dist_train.errors import LaunchError
from dist_train.train import distributed, rendezvous

from conftest import REPO

RANK_AND_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_TASK = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_ID",
              "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST",
              "SLURM_NTASKS_PER_NODE")

HAND_EXPANDED = {
    "gpu[017-018,020]": ["gpu017", "gpu018", "gpu020"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "node-[01-04]": ["node-01", "node-02", "node-03", "node-04"],
    "login7": ["login7"],
    "x[8-10]": ["x8", "x9", "x10"],
    "rack[1-2]-n[08-09]": ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"],
}


@pytest.fixture
def slurm_task(monkeypatch):
    """Set the variables srun gives one task, on a clean environment (no launcher, no other job); `extra` may
    override them or, set to "", remove one."""
    for name in RANK_AND_RENDEZVOUS + SLURM_TASK:
        monkeypatch.delenv(name, raising=False)

    def set_task(rank: int, ntasks: int, nodelist: str, job_id: str, **extra: str) -> None:
        for name, value in {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_JOB_ID": job_id,
                            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(ntasks),
                            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, **extra}.items():
            if value:
                monkeypatch.setenv(name, value)
            else:
                monkeypatch.delenv(name, raising=False)

    return set_task


def scontrol_runs() -> bool:
    try:
        return subprocess.run(["scontrol", "show", "hostnames", "a[1-2]"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# ------------------------------------------------------------------ host lists


@pytest.mark.parametrize("nodelist", sorted(HAND_EXPANDED))
def test_compact_host_lists_expand_as_written_by_hand(nodelist):
    assert rendezvous.expand_nodelist(nodelist) == HAND_EXPANDED[nodelist]


@pytest.mark.skipif(not scontrol_runs(), reason="scontrol is missing or has no SLURM configuration here")
@pytest.mark.parametrize("nodelist", sorted(HAND_EXPANDED))
def test_the_parser_agrees_with_scontrol(nodelist):
    slurm = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    assert rendezvous.expand_nodelist(nodelist) == slurm.stdout.split()


@pytest.mark.parametrize("nodelist", ["gpu[017-", "gpu[5-3]", "a,,b", "gpu[x-y]"])
def test_a_malformed_host_list_is_refused_with_what_to_do(nodelist):
    with pytest.raises(ValueError, match="MASTER_ADDR|backwards") as caught:
        rendezvous.expand_nodelist(nodelist)
    assert nodelist in str(caught.value)


# ------------------------------------------------------------------ address and port


def test_rank_5_of_8_on_two_nodes_meets_rank_0_on_the_first_node(slurm_task):
    slurm_task(5, 8, "gpu[017-018]", "4242", SLURM_LOCALID="1")
    assert distributed.world_info_from_env() == (5, 8, 1)
    rank_5 = rendezvous.master_env(os.environ, 8)
    slurm_task(0, 8, "gpu[017-018]", "4242", SLURM_LOCALID="0")
    assert rendezvous.master_env(os.environ, 8) == rank_5
    assert rank_5 == {"MASTER_ADDR": "gpu017", "MASTER_PORT": str(15000 + 131502 % 17000)}  # 31 * 4242 = 131502


def test_the_step_node_list_names_the_first_node_of_the_step(slurm_task):
    """`srun -N2` inside a four-node allocation runs task 0 on the step's first node, not the job's."""
    slurm_task(1, 2, "gpu[017-020]", "4242", SLURM_STEP_NODELIST="gpu[019-020]", SLURM_NODELIST="gpu[019-020]")
    assert rendezvous.master_env(os.environ, 2)["MASTER_ADDR"] == "gpu019"


def test_two_jobs_sharing_a_node_get_two_ports(slurm_task):
    ports = set()
    for job_id in range(90000, 90100):  # a hundred consecutive jobs, as a busy cluster hands them out
        slurm_task(0, 2, "gpu[017-018]", str(job_id))
        ports.add(rendezvous.master_env(os.environ, 2)["MASTER_PORT"])
    assert len(ports) == 100
    assert all(15000 <= int(port) < 32000 for port in ports)  # below Linux's ephemeral range


def test_two_steps_of_one_job_get_two_ports(slurm_task):
    slurm_task(0, 2, "gpu[017-018]", "4242", SLURM_STEP_ID="0")
    first = rendezvous.master_env(os.environ, 2)["MASTER_PORT"]
    slurm_task(0, 2, "gpu[017-018]", "4242", SLURM_STEP_ID="1")
    assert rendezvous.master_env(os.environ, 2)["MASTER_PORT"] == str(int(first) + 1)


def test_torchrun_variables_win_over_slurm(slurm_task, monkeypatch):
    """`srun torchrun ...`: torchrun's RANK/WORLD_SIZE/MASTER_* are what the ranks agreed on."""
    slurm_task(0, 2, "gpu[017-018]", "4242")
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.world_info_from_env()[:2] == (3, 4)
    assert rendezvous.master_env(os.environ, 4) == {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}


def test_torchrun_ranks_without_an_address_do_not_read_slurm(slurm_task, monkeypatch):
    slurm_task(0, 2, "gpu[017-018]", "4242")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rendezvous.master_env(os.environ, 2) == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_a_launcher_exported_address_or_port_is_kept_under_slurm(slurm_task, monkeypatch):
    """submitit and many sbatch templates export MASTER_ADDR (and MASTER_PORT) before srun."""
    slurm_task(1, 2, "gpu[017-018]", "4242")
    monkeypatch.setenv("MASTER_ADDR", "gpu018-ib")
    assert rendezvous.master_env(os.environ, 2) == {"MASTER_ADDR": "gpu018-ib", "MASTER_PORT": "27502"}
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert rendezvous.master_env(os.environ, 2) == {"MASTER_ADDR": "gpu018-ib", "MASTER_PORT": "12345"}


def test_a_lone_process_takes_a_free_port(slurm_task):
    """DeepSpeed's one-rank group: a port nobody holds (we can bind it), not the job's shared one."""
    slurm_task(0, 1, "gpu017", "4242")
    chosen = rendezvous.master_env(os.environ, 1)
    assert chosen["MASTER_ADDR"] == "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(chosen["MASTER_PORT"])))


def _job_id_with_free_port() -> tuple[int, int]:
    """A job id whose SLURM port (by the documented rule) is free on this machine now."""
    for job_id in range(os.getpid() % 17000, os.getpid() % 17000 + 200):
        port = 15000 + (31 * job_id) % 17000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job_id, port
    raise AssertionError("no free port among 200 job ids")


RANK_SCRIPT = """
import os, torch, torch.distributed as dist
from dist_train.train import distributed
env = distributed.init_distributed("cpu", 30)
total = distributed.all_reduce_sum(env, torch.tensor([env.rank + 1.0]))
print(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], env.rank, env.world_size, int(total.item()))
distributed.destroy()
"""


def test_two_srun_style_ranks_meet_from_slurm_variables_alone(tmp_path):
    """Two real processes with only what srun exports (no MASTER_*) form a gloo group on the derived pair."""
    job_id, port = _job_id_with_free_port()
    base = {name: value for name, value in os.environ.items() if name not in RANK_AND_RENDEZVOUS + SLURM_TASK}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SLURM_NTASKS="2", SLURM_JOB_ID=str(job_id),
                SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2",
                SLURM_JOB_NODELIST="localhost,node-of-rank-1", SLURM_NODELIST="localhost,node-of-rank-1")
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**base, "SLURM_PROCID": str(rank),
                                                                       "SLURM_LOCALID": "0"},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [process.communicate(timeout=90) for process in ranks]
    for process, (_, stderr) in zip(ranks, outputs):
        assert process.returncode == 0, stderr
    assert sorted(stdout.split() for stdout, _ in outputs) == [
        ["localhost", str(port), "0", "2", "3"], ["localhost", str(port), "1", "2", "3"]]


@pytest.mark.parametrize("job_id", ["114", "4242"])
def test_a_submitit_job_meets_on_our_port_below_the_ephemeral_range(slurm_task, monkeypatch, job_id):
    """submitit would take random.Random(job id).randint(20000, 60000): 46368 for job 114, where an outgoing
    connection on the node can already hold the port (EADDRINUSE on the test cluster). Ours is the rule's."""
    from dist_train.slurm.job import export_rendezvous

    slurm_task(1, 2, "gpu[017-018]", job_id, SLURM_LOCALID="0", SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    expected = 15000 + (31 * int(job_id)) % 17000  # by hand: 18534 for job 114, 27502 for job 4242
    with mock.patch.dict(os.environ):  # submitit exports RANK, WORLD_SIZE, ...: none may outlive the test
        dist_env = export_rendezvous()
        exported = os.environ["MASTER_PORT"]
    assert (dist_env.master_addr, dist_env.master_port, dist_env.rank) == ("gpu017", expected, 1)
    assert exported == str(expected) and expected < ephemeral_low


def test_a_submitit_job_keeps_the_port_it_was_given(slurm_task, monkeypatch):
    from dist_train.slurm.job import export_rendezvous

    slurm_task(0, 2, "gpu[017-018]", "114", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="2")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("MASTER_PORT", "12345")
    with mock.patch.dict(os.environ):
        assert export_rendezvous().master_port == 12345


# ------------------------------------------------------------------ devices


@pytest.fixture
def visible_gpus(monkeypatch):
    """Pretend `count` GPUs are visible and record set_device calls.

    This machine has no GPU and cannot have one, so CUDA's three queries are patched; what is tested is
    only which index this code asks for, which is all pick_device decides.
    """
    calls: list[int] = []

    def show(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", calls.append)
        return calls

    return show


@pytest.mark.parametrize("requested", ["cuda", "auto"])
def test_a_task_that_sees_one_gpu_takes_it_whatever_its_local_rank(visible_gpus, requested):
    """`--gpus-per-task=1` / `--gpu-bind`: local rank 3 sees a single GPU, index 0."""
    calls = visible_gpus(1)
    assert distributed.pick_device(requested, local_rank=3) == torch.device("cuda", 0)
    assert calls == [0]


def test_ranks_wrap_over_the_visible_gpus(visible_gpus):
    calls = visible_gpus(4)
    devices = [distributed.pick_device("cuda", local_rank) for local_rank in range(6)]
    assert devices == [torch.device("cuda", index) for index in (0, 1, 2, 3, 0, 1)]
    assert calls == [0, 1, 2, 3, 0, 1]


def test_cpu_is_chosen_without_touching_cuda(visible_gpus):
    calls = visible_gpus(2)
    assert distributed.pick_device("cpu", local_rank=1) == torch.device("cpu")
    assert calls == []


@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_runs_autotune_and_use_tf32_unless_deterministic(deterministic):
    """Only flags are set (no GPU here); a CPU device leaves them untouched."""
    import torch

    from dist_train.train.distributed import configure_backends

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    try:
        cudnn.benchmark = cudnn.allow_tf32 = matmul.allow_tf32 = deterministic
        configure_backends(torch.device("cpu"), deterministic)
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (deterministic,) * 3
        configure_backends(torch.device("cuda", 0), deterministic)
        assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == (not deterministic,) * 3
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before


def test_the_batch_script_of_a_multi_task_job_is_refused_not_a_rank(slurm_task):
    """sbatch --ntasks=2 running `python -m dist_train.main` itself (no srun): SLURM_PROCID=0, SLURM_NTASKS=2 and
    no step (as the test cluster's batch step shows). Read as rank 0 of 2, it waited for a rank 1 nobody starts."""
    slurm_task(0, 2, "node1", "4242", SLURM_STEP_ID="", SLURM_STEP_NUM_TASKS="")
    with pytest.raises(LaunchError, match="batch script.*srun python -m dist_train.main.*--ntasks=1"):
        distributed.world_info_from_env()
    slurm_task(0, 1, "node1", "4242", SLURM_STEP_ID="", SLURM_STEP_NUM_TASKS="")  # one task: one process, fine
    assert distributed.world_info_from_env() == (0, 1, 0)


def test_an_srun_step_is_as_large_as_the_step_not_the_allocation(slurm_task):
    """`srun --ntasks=2` inside a four-task allocation: two ranks."""
    slurm_task(1, 4, "gpu[017-018]", "4242", SLURM_STEP_NUM_TASKS="2")
    assert distributed.world_info_from_env()[:2] == (1, 2)
