"""dist_train.tracking with real offline wandb runs, read back with `wandb leet inspect`.

`wandb leet inspect --json <run dir>` prints the run's .wandb transaction log as one JSON record
per line ({"type": "run" | "history" | "summary" | "exit" | ..., <type>: {...}}); with
`--summary --json` it prints one object with the run's state, config and latest summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_train import tracking
from dist_train.config import Config, config_from_dict, to_dict
from dist_train.evaluation import metrics
from dist_train.redact import scrub_secrets
from dist_train.tracking import Tracker
from dist_train.train.distributed import DistEnv

FAKE_API_KEY = "sk-FAKE" + "0123456789abcdef" * 2
FAKE_TOKEN = "tok-FAKE-9f8e7d6c5b4a"


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))


def make_config(wandb: bool = True, mode: str = "offline", progress: str = "none", **top) -> Config:
    return config_from_dict({
        "name": "glaucoma-b0", "data": {"train_shards": "shards/train-{000..003}.tar", "val_shards": "v.tar"},
        "tracking": {"wandb": {"enabled": wandb, "mode": mode, "project": "airogs", "group": "sweep1",
                               "tags": ["cpu", "test"]}, "progress": progress},
        **top,
    })


def leet_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb log, via `wandb leet inspect --json`."""
    output = subprocess.run([wandb_cli(), "leet", "inspect", "--json", str(run_dir)],
                            check=True, capture_output=True, text=True, timeout=60).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def leet_summary(run_dir: Path) -> dict:
    output = subprocess.run([wandb_cli(), "leet", "inspect", "--summary", "--json", str(run_dir)],
                            check=True, capture_output=True, text=True, timeout=60).stdout
    return json.loads(output)


def wandb_cli() -> str:
    beside_python = Path(sys.executable).parent / "wandb"
    return str(beside_python) if beside_python.exists() else shutil.which("wandb") or "wandb"


def history(records: list[dict]) -> list[dict]:
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def log_some_steps(tracker: Tracker, steps: range, epoch: int = 0) -> None:
    for step in steps:
        record = {"epoch": epoch, "loss": 1.0 / step, "lr": [1e-3, 1e-4], "images_per_s": 40.0}
        tracker.log_train(step, record)


def test_offline_run_reads_back_config_history_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config()
    tracker = Tracker(cfg, run_dir, DistEnv())
    log_some_steps(tracker, range(1, 5))
    tracker.log_event("phase", {"epoch": 1, "train": "last_2_blocks", "trainable_params": 1234})
    labels = np.r_[np.zeros(190), np.ones(10)]
    scores = labels + np.random.default_rng(0).normal(size=labels.size)
    evaluation = {"epoch": 0, "val_loss": 0.4, **metrics.compute_all(labels, scores)}
    tracker.log_eval(4, evaluation, roc_png=metrics.plot_roc(labels, scores, tmp_path / "roc.png"))
    tracker.finish({"best_alpha": evaluation["alpha"], "wall_time_s": 3.5}, exit_code=0)

    (wandb_run,) = offline_runs(run_dir)
    records = leet_records(wandb_run)
    run_record = next(record["run"] for record in records if record["type"] == "run")
    assert run_record["run_id"] == tracker.run_id and run_record["run_group"] == "sweep1"
    assert run_record["tags"] == ["cpu", "test"] and run_record["display_name"] == "glaucoma-b0"
    logged_config = {key: value for key, value in run_record["config"]["update"].items() if key != "_wandb"}
    assert logged_config["data"]["train_shards"] == cfg.data.train_shards
    assert logged_config["optim"]["lr"] == cfg.optim.lr and set(logged_config) == set(to_dict(cfg))

    rows = history(records)
    assert [row["trainer/step"] for row in rows] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in rows] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert rows[0]["train/lr/1"] == pytest.approx(1e-4)
    last = rows[-1]
    assert last["val/alpha"] == pytest.approx(evaluation["alpha"]) and last["val/loss"] == 0.4
    assert last["val/tp"] == evaluation["tp"] and last["phase/trainable_params"] == 1234
    assert last["val/roc._type"] == "image-file" and last["val/roc.path"].endswith(".png")
    assert [record["exit"]["exit_code"] for record in records if record["type"] == "exit"] == [0]

    summary = leet_summary(wandb_run)
    assert summary["state"] == "finished" and summary["run_id"] == tracker.run_id
    assert summary["summary"]["best_alpha"] == pytest.approx(evaluation["alpha"])
    assert summary["summary"]["wall_time_s"] == 3.5


def test_metrics_jsonl_records_and_summary_file(tmp_path):
    tracker = Tracker(make_config(wandb=False), tmp_path, DistEnv())
    tracker.log_train(1, {"epoch": 0, "loss": np.float32(0.5), "lr": np.array([1e-3])})
    tracker.log_eval(1, {"epoch": 0, "alpha": float("nan"), "predicted_positives": np.int64(0)})
    tracker.log_event("checkpoint", {"path": "ckpt/step_1"})
    tracker.finish({"best_alpha": 0.7}, exit_code=3)
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [line["kind"] for line in lines] == ["train", "eval", "checkpoint", "summary"]
    assert all(list(line)[:3] == ["kind", "step", "time"] and line["step"] == 1 for line in lines)
    assert lines[0]["loss"] == 0.5 and lines[0]["lr"] == [1e-3]
    assert lines[1]["alpha"] is None and lines[1]["predicted_positives"] == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {"best_alpha": 0.7, "exit_code": 3, "run_id": None} == {
        key: value for key, value in lines[-1].items() if key not in ("kind", "step", "time")}


def test_resume_continues_the_same_run_and_drops_later_lines(tmp_path):
    run_dir = tmp_path / "run"
    first = Tracker(make_config(), run_dir, DistEnv())
    log_some_steps(first, range(1, 7))
    first.finish({"preempted": True}, exit_code=1)
    second = Tracker(make_config(), run_dir, DistEnv(), run_id=first.run_id, resume_step=4)
    second.log_event("resume", {"from_step": 4})
    log_some_steps(second, range(5, 9), epoch=1)
    second.finish({"best_alpha": 0.5})

    assert second.run_id == first.run_id
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [line["step"] for line in lines if line["kind"] == "train"] == list(range(1, 9))
    assert [line["epoch"] for line in lines if line["kind"] == "train"][3:5] == [0, 1]
    assert [line["kind"] for line in lines].count("summary") == 1
    runs = offline_runs(run_dir)
    assert len(runs) == 2
    resumed = leet_records(runs[1])
    assert next(r["run"]["run_id"] for r in resumed if r["type"] == "run") == first.run_id
    resumed_rows = history(resumed)
    assert [row["trainer/step"] for row in resumed_rows] == [4, 5, 6, 7, 8]
    assert resumed_rows[0]["resume/from_step"] == 4 and "train/loss" not in resumed_rows[0]


def test_secrets_never_reach_files_or_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    monkeypatch.setenv("MY_TOKEN", FAKE_TOKEN)
    cfg = make_config(data={"train_shards": f"pipe:curl -H 'Bearer {FAKE_TOKEN}' https://x/{{0..3}}.tar",
                            "val_shards": "v.tar"})
    tracker = Tracker(cfg, tmp_path / "run", DistEnv())
    tracker.log_event("warning", {"message": f"download with {FAKE_TOKEN} failed", "api_key": "abc-123"})
    log_some_steps(tracker, range(1, 3))
    tracker.finish({"shards": cfg.data.train_shards})
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files)
    for path in files:
        content = path.read_bytes()
        assert FAKE_TOKEN.encode() not in content and FAKE_API_KEY.encode() not in content, path
    assert b"abc-123" not in (tmp_path / "run" / "metrics.jsonl").read_bytes()
    (wandb_run,) = offline_runs(tmp_path / "run")
    assert "***" in leet_summary(wandb_run)["config"]["data"]["train_shards"]


def test_scrub_secrets_masks_values_and_secret_keys():
    environ = {"HF_TOKEN": "hf_abcdef", "DB_PASSWORD_FILE": "pw12345", "SHORT_KEY": "ab", "HOME": "/root"}
    secrets = tracking.secret_values(environ)
    assert secrets == ["hf_abcdef", "pw12345"]
    record = {"url": "x?t=hf_abcdef", "nested": [("pw12345", 3)], "api_key": "zzz", "lr": 1e-3}
    scrubbed = scrub_secrets(record, secrets)
    assert scrubbed == {"url": "x?t=***", "nested": [("***", 3)], "api_key": "***", "lr": 1e-3}


def test_auto_mode_goes_offline_without_a_key_and_says_how_to_sync(tmp_path, capsys):
    tracker = Tracker(make_config(mode="auto"), tmp_path / "run", DistEnv())
    tracker.finish({})
    hint = [line for line in capsys.readouterr().err.splitlines() if "wandb sync" in line]
    assert len(hint) == 1 and str(offline_runs(tmp_path / "run")[0]) in hint[0]


def test_wandb_failure_becomes_a_warning_and_training_goes_on(tmp_path, monkeypatch):
    import wandb

    def refuse(**_kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    tracker = Tracker(make_config(mode="online"), tmp_path, DistEnv(), run_id="keepme1")
    log_some_steps(tracker, range(1, 3))
    tracker.finish({"best_alpha": 0.1})
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[0]["kind"] == "warning" and "unreachable" in lines[0]["message"]
    assert [line["kind"] for line in lines[1:]] == ["train", "train", "summary"]
    assert tracker.run_id == "keepme1"


def test_disabled_wandb_is_never_imported(tmp_path):
    script = (
        "import sys; from pathlib import Path\n"
        "from dist_train.config import config_from_dict; from dist_train.train.distributed import DistEnv\n"
        "from dist_train.tracking import Tracker\n"
        "cfg = config_from_dict({'data': {'train_shards': 'a', 'val_shards': 'b'},\n"
        "                        'tracking': {'progress': 'plain'}})\n"
        f"t = Tracker(cfg, Path({str(tmp_path)!r}), DistEnv()); t.log_train(1, {{'loss': 1.0}})\n"
        "p = t.progress(2); p.update(2, loss=1.0); p.close(); t.finish({})\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1], timeout=120)


def test_non_main_ranks_do_nothing(tmp_path, capsys):
    tracker = Tracker(make_config(progress="plain"), tmp_path / "rank1", DistEnv(rank=1, world_size=2),
                      run_id="abc")
    log_some_steps(tracker, range(1, 3))
    tracker.log_eval(2, {"alpha": 0.5})
    tracker.log_event("phase", {"epoch": 1})
    with tracker.progress(10) as progress:
        progress.update(10, loss=0.1)
    tracker.finish({})
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().err == ""
    assert tracker.run_id == "abc"


def test_plain_progress_prints_periodic_lines_with_eta(tmp_path, capsys):
    tracker = Tracker(make_config(wandb=False, progress="plain"), tmp_path, DistEnv())
    progress = tracker.progress(total=100, initial=20, desc="epoch 3")
    for _ in range(80):
        progress.update(1, loss=0.123456, lr=[1e-4, 1e-5], img_s=51.2)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 25
    assert lines[-1].startswith("epoch 3: 100/100 [") and "loss=0.1235" in lines[-1]
    assert "lr=0.0001,1e-05" in lines[-1] and "<" in lines[0]
