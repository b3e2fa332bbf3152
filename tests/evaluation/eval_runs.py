"""Tiny runs trained and exported as a user does it, once per test session however many modules ask.

Each run lands in a fixed folder under the session's base temp dir, so a second test module asking
for the same run finds its export there instead of training again (pytest would otherwise run a
session fixture imported into two modules twice).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINED_RUN = ("train.epochs=2", "eval.tta=hflip", "data.clahe=true")
"""The run most evaluation tests score: CLAHE and a TTA, so prediction must repeat both to match training."""
OTHER_RUN = ("model.backbone=test_efficientnet", "data.image_size=48", "eval.tta=none", "train.seed=1",
             "train.epochs=1")
"""An ensemble's second member: another backbone, image size, seed, no CLAHE, no TTA (its own preprocessing)."""


def trained_export(tmp_path_factory: pytest.TempPathFactory, shards: Path, name: str, *overrides: str) -> Path:
    """The run directory of configs/test_tiny.yaml trained on `shards` as run `name`, with export/ written."""
    root = tmp_path_factory.getbasetemp() / "trained-exports"
    run = root / name
    if (run / "export" / "model.json").is_file():
        return run
    _run("-m", "dist_train.main", "--config", "configs/test_tiny.yaml", "--resume", "none", "--set",
         f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", f"run_root={root}",
         f"name={name}", *overrides)
    _run("launch/export.py", str(run), umask=0o022)
    return run


def _run(*args: str, umask: int | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    assert result.returncode == 0, result.stderr[-3000:]


def load_cli(name: str) -> ModuleType:
    """launch/<name>.py as a module, so a test can call its `main(argv)` in this process."""
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "launch" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(cli: ModuleType, *argv: object) -> tuple[int, str, str]:
    """The command's own entry function in this process: its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()
