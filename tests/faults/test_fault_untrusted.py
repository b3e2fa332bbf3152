"""Scenario 11: weight and checkpoint files carrying a pickled payload that would run code.

The payload, when unpickled, runs `touch <marker>`; the marker appearing means code ran. Every case
goes through the CLI's function in this process, so a payload that did run would run here, which
is harmless (it only creates the marker) and is exactly what the test has to detect.

What loads what: `model.pretrained` goes through `torch.load(weights_only=True)` or safetensors;
a checkpoint's trainer.json is JSON; its tensors are read by DCP with `torch.load(weights_only=True)`;
but DCP reads the checkpoint's `.metadata` with plain `pickle.load`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from fault_helpers import main_argv, main_in_process, overrides, pointer, text_lines

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class _Payload:
    """Unpickling this runs a shell command: the stand-in for an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    return make_shards().root


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


def _malicious_torch_file(path: Path, marker: Path) -> Path:
    """A torch.save file with real-looking weights plus the payload."""
    torch.save({"state_dict": {"conv_stem.weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_malicious_pretrained_file_is_refused_and_runs_nothing(shards, tmp_path, marker, suffix):
    """A pickled payload as model.pretrained (also disguised as .safetensors): refused, nothing executed."""
    weights = _malicious_torch_file(tmp_path / f"weights{suffix}", marker)
    code, stderr = main_in_process(main_argv(overrides(shards, tmp_path / "runs", f"model.pretrained={weights}")))
    assert not marker.exists(), "the payload ran"
    assert code != 0, stderr[-2000:]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_malicious_pretrained_file_refusal_is_one_clear_line(shards, tmp_path, marker, suffix):
    """Bad input: exit 2, one line naming the file (and for a pickle, the refused global), nothing written."""
    weights = _malicious_torch_file(tmp_path / f"weights{suffix}", marker)
    run_root = tmp_path / "runs"
    code, stderr = main_in_process(main_argv(overrides(shards, run_root, f"model.pretrained={weights}")))
    lines = text_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    assert str(weights) in lines[0] and "weights_only=False" not in lines[0], lines[0]
    if suffix == ".pth":
        assert "posix.system" in lines[0], lines[0]
    assert not run_root.exists()


def test_tampered_checkpoint_metadata_runs_nothing_on_resume(shards, tmp_path, marker):
    """Scenario 11: a checkpoint whose DCP .metadata carries the payload; resuming must refuse it unexecuted."""
    run_root = tmp_path / "runs"
    first = overrides(shards, run_root, "train.epochs=1", "train.steps_per_epoch=1")
    code, stderr = main_in_process(main_argv(first, resume="none"))
    assert code == 0, stderr[-2000:]
    checkpoints = run_root / "test_tiny" / "checkpoints"
    tampered = checkpoints / pointer(checkpoints) / ".metadata"
    tampered.write_bytes(pickle.dumps(_Payload(marker)))

    code, stderr = main_in_process(main_argv(overrides(shards, run_root, "train.epochs=2"), resume="auto"))
    assert not marker.exists(), "resuming from the tampered checkpoint ran the payload"
    assert code != 0 and str(tampered.parent) in stderr, stderr[-2000:]


def _deepspeed_tampered_resume(env, shards, run_root: Path, marker: Path) -> tuple[str, str]:
    """Train a step under DeepSpeed ZeRO-1 on two ranks and save; rank 0 puts the payload into its saved
    optimizer states (DeepSpeed unpickles them with weights_only=False); resume. The ranks share the check,
    and this file (the second of three, sorted) is rank 1's to read: rank 0 must refuse it too.
    Returns (the tampered file, the error the resume raised on this rank)."""
    from dist_train.errors import CheckpointError
    from dist_train.train import distributed
    from dist_train.train.checkpoint import read_pointer
    from dist_train.train.loop import Trainer

    from run_helpers import tiny_config

    cfg = tiny_config(shards, run_root, "engine.kind=deepspeed", "engine.zero_stage=1", "train.steps_per_epoch=1")
    trainer = Trainer(cfg, env)
    trainer.enter_phase(0)
    trainer.run_steps(0, 1)
    folder = trainer.save_checkpoint()
    trainer.tracker.finish(trainer.summary())
    tampered = folder / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if env.is_main:
        states = torch.load(tampered, map_location="cpu", weights_only=False)  # the file this test just wrote
        torch.save({**states, "extra": _Payload(marker)}, tampered)
    distributed.barrier(env)
    root = cfg.run_dir / "checkpoints"
    try:
        Trainer(cfg, env, resume_from=root / str(read_pointer(root / "latest")))
    except CheckpointError as error:
        return str(tampered), str(error)
    return str(tampered), ""


@pytest.mark.slow
def test_tampered_deepspeed_checkpoint_runs_nothing_on_resume(make_shards, tmp_path, marker):
    """DeepSpeed's own loader would unpickle the payload (weights_only=False); every rank refuses the file first."""
    from multiprocess import run_on_ranks

    ranks = run_on_ranks(_deepspeed_tampered_resume, 2, make_shards(), tmp_path / "runs", marker, spawn=True)
    assert not marker.exists(), "resuming from the tampered DeepSpeed checkpoint ran the payload"
    for tampered, error in ranks:
        assert error.startswith(tampered) and "posix.system" in error and "refusing" in error, error
