"""dist_train.report and the compare/report CLIs, on run directories written the way the loop writes them.

The HTML report is rendered in headless Chromium (tests/install_test_deps.sh installs it): the
screenshot must not be blank and the rendered DOM must hold the comparison table's figures; on real runs
(with checkpoints and val shards) every class-activation overlay must be decoded by the browser.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from dist_train import report
from dist_train.config import config_from_dict, save_config
from dist_train.evaluation import metrics
from dist_train.tracking import Tracker
from dist_train.train.distributed import DistEnv

EPOCHS, STEPS_PER_EPOCH, VAL_SIZE = 5, 4, 600
REPO = Path(__file__).resolve().parents[1]


def write_fake_run(root: Path, name: str, *, loss: str, lr: float, bias: float, world_size: int,
                   seed: int) -> Path:
    """A finished run: config.yaml, metrics.jsonl, summary.json and predictions_val.csv.

    Validation scores are sigmoid(logit) with class separation growing per epoch; a strongly
    negative `bias` makes the first epochs predict no positive at 0.5, as real runs often do.
    """
    cfg = config_from_dict({
        "name": name, "data": {"train_shards": "shards/train-{000..007}.tar", "val_shards": "shards/val.tar"},
        "loss": {"name": loss}, "optim": {"lr": lr}, "train": {"epochs": EPOCHS},
        "unfreeze": {"phases": [{"from_epoch": 0, "train": "head"},
                                {"from_epoch": 2, "train": "last_2_blocks", "lr": lr / 10}]},
        "tracking": {"progress": "none"},
    })
    run_dir = root / name
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    tracker = Tracker(cfg, run_dir, DistEnv())
    rng = np.random.default_rng(seed)
    labels = (rng.random(VAL_SIZE) < 0.03).astype(int)
    step = 0
    for epoch in range(EPOCHS):
        phase = next(index for index, p in reversed(list(enumerate(cfg.unfreeze.phases))) if p.from_epoch <= epoch)
        if cfg.unfreeze.phases[phase].from_epoch == epoch:
            tracker.log_event("phase", {"epoch": epoch, "phase": phase, "train": cfg.unfreeze.phases[phase].train,
                                        "trainable_params": 330_000 * (1 + 3 * phase)})
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            tracker.log_train(step, {"epoch": epoch, "loss": float(0.9 / (1 + step * 0.1) + rng.random() * 0.02),
                                     "lr": [lr, lr / 10], "images_per_s": float(40 + rng.random()),
                                     "phase": cfg.unfreeze.phases[phase].train})
        logits = rng.normal(size=VAL_SIZE) + (0.5 + 0.6 * epoch) * labels + bias + 0.8 * epoch
        scores = 1 / (1 + np.exp(-logits))
        evaluation = metrics.compute_all(labels, scores)
        tracker.log_eval(step, {"epoch": epoch, "val_loss": float(0.5 - 0.05 * epoch), **evaluation,
                                "predicted_positives": int((scores >= 0.5).sum())})
        rows = [f"VAL{index:05d},{label},{float(score)!r},,"
                for index, (label, score) in enumerate(zip(labels, scores))]
        header = "id,label,likelihood,referable_glaucoma,error\n"
        (run_dir / "predictions_val.csv").write_text(header + "\n".join(rows) + "\n")
    tracker.finish({"wall_time_s": 3725.0 + seed, "images_per_s": 40.5 + seed, "world_size": world_size,
                    "epochs": EPOCHS}, exit_code=0)
    return run_dir


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [write_fake_run(root, "b0-bce", loss="bce", lr=1e-3, bias=-4.0, world_size=2, seed=1),
            write_fake_run(root, "b0-focal", loss="focal", lr=3e-4, bias=-2.5, world_size=4, seed=2)]


def records_of(run_dir: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == kind]


def test_compare_rows_match_the_records(run_dirs):
    runs = [report.load_run(run_dir) for run_dir in run_dirs]
    rows = dict(report.compare_rows(runs))
    assert rows["loss.name"] == ["bce", "focal"] and rows["optim.lr"] == [1e-3, 3e-4]
    assert rows["unfreeze.phases[1].lr"] == pytest.approx([1e-4, 3e-5])
    assert "data.train_shards" not in rows and "name" not in rows
    for column, run_dir in enumerate(run_dirs):
        evals = records_of(run_dir, "eval")
        summary = json.loads((run_dir / "summary.json").read_text())
        for key, label in (("alpha", "best α"), ("beta", "best β"), ("auc", "best AUC")):
            best = max(evals, key=lambda record, key=key: record[key])
            assert rows[label][column] == (pytest.approx(best[key]), best["epoch"])
        first = next((record["epoch"] for record in evals if record["predicted_positives"] > 0), None)
        assert rows["first positive prediction (epoch)"][column] == first
        assert rows["wall time"][column] == summary["wall_time_s"]
        assert rows["images/s"][column] == summary["images_per_s"]
        assert rows["world size"][column] == summary["world_size"]
    assert rows["first positive prediction (epoch)"][0] > 0, "the fake bce run should start predicting none"


def test_first_positive_falls_back_to_tp_plus_fp():
    run = report.RunData("r", records=[{"kind": "eval", "epoch": 0, "tp": 0, "fp": 0},
                                       {"kind": "eval", "epoch": 1, "tp": 0, "fp": 2}])
    assert report.first_positive_epoch(run) == 1


def test_compare_cli_markdown_and_plot(run_dirs, tmp_path, capsys):
    compare = load_cli("compare")
    plot = tmp_path / "curves.png"
    assert compare.main([*map(str, run_dirs), "--markdown", "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "|  | b0-bce | b0-focal |" and table[1] == "| --- | --- | --- |"
    assert any(line.startswith("| wall time | 1:02:06 | 1:02:07 |") for line in table)
    assert Image.open(plot).size[0] > 500
    assert compare.main([*map(str, run_dirs)]) == 0
    assert re.search(r"world size\s+2\s+4", capsys.readouterr().out)


def test_compare_wandb_without_key_fails_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert load_cli("compare").main(["--wandb-project", "airogs", "--group", "g"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "API key" in error


def test_wandb_history_rows_become_records():
    rows = [{"trainer/step": 1, "train/epoch": 0, "train/loss": 0.7, "train/lr/0": 1e-3},
            {"trainer/step": 4, "val/epoch": 0, "val/alpha": 0.61, "val/loss": 0.3, "val/roc._type": "image-file"}]
    fake = SimpleNamespace(name="w", scan_history=lambda: rows, config={"optim": {"lr": 1e-3}, "_wandb": {}},
                           summary={"world_size": 2, "_runtime": 5})
    run = report._from_wandb(fake)
    assert run.of_kind("eval")[0]["val_loss"] == 0.3 and report.best_with_epoch(run, "alpha") == (0.61, 0)
    assert report.per_epoch(run, "train", "loss") == {0: 0.7} and run.summary == {"world_size": 2}


def test_report_is_self_contained(run_dirs, tmp_path):
    out = load_cli("report").write_report(run_dirs, tmp_path / "report.html")
    page = out.read_text()
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * 7
    assert "http://" not in page and "https://" not in page
    assert page.count("last_2_blocks") >= 2 and "predicted positive" in page


def test_a_run_without_checkpoints_gets_its_report_with_a_note_instead_of_maps(run_dirs, tmp_path):
    page = report.write_report(run_dirs, tmp_path / "report.html").read_text()
    for run_dir in run_dirs:
        assert f"No class-activation maps: {run_dir.name} has no checkpoint" in page
    assert 'class="cam"' not in page and page.count("reliability diagram") == 2


def test_a_failure_while_mapping_drops_only_that_section_with_a_warning(tmp_path, caplog):
    import webdataset as wds

    from conftest import jpeg_bytes

    run_dir = write_fake_run(tmp_path, "broken", loss="bce", lr=1e-3, bias=-1.0, world_size=1, seed=3)
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "val-000000.tar")) as writer:  # the fake run's own val ids
        for index in range(VAL_SIZE):
            writer.write({"__key__": f"VAL{index:05d}", "jpg": jpeg_bytes(index), "cls": b"0"})
    config = (run_dir / "config.yaml").read_text().replace("shards/val.tar", f"{tmp_path}/shards/val-*.tar")
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004" / "trainer.json").write_text("{ not json")
    (run_dir / "checkpoints" / "latest").write_text("step-00000004\n")
    with caplog.at_level("WARNING", logger="dist_train.report"):
        page = report.write_report([run_dir], tmp_path / "report.html").read_text()
    assert "Class-activation maps skipped:" in page and "reliability diagram" in page
    assert any("class-activation maps of broken skipped" in record.getMessage() for record in caplog.records)


def test_the_ece_shown_is_the_binned_gap_between_frequency_and_likelihood(run_dirs, tmp_path):
    page = report.write_report(run_dirs[:1], tmp_path / "report.html").read_text()
    shown = float(re.search(r'<span id="ece-b0-bce">([0-9.]+)</span>', page).group(1))
    rows = [line.split(",") for line in (run_dirs[0] / "predictions_val.csv").read_text().splitlines()[1:]]
    labels, scores = np.array([int(row[1]) for row in rows]), np.array([float(row[2]) for row in rows])
    gap = 0.0
    for low in np.arange(10) / 10:  # (low, low + 0.1], the first bin also taking 0
        members = (scores > low) & (scores <= low + 0.1) | ((low == 0) & (scores == 0))
        if members.any():
            gap += members.sum() / len(scores) * abs(labels[members].mean() - scores[members].mean())
    assert shown == pytest.approx(gap, abs=1e-4)


def test_report_renders_in_headless_chromium(run_dirs, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found: run tests/install_test_deps.sh (apt-get install -y chromium)")
    out = report.write_report(run_dirs, tmp_path / "report.html")
    screenshot = tmp_path / "shot.png"
    chromium(browser, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000", out.as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280) and pixels.var() > 100, "the screenshot is blank"
    dom = chromium(browser, tmp_path, "--dump-dom", out.as_uri())
    table = re.search(r'<table id="comparison">.*?</table>', dom, re.S).group(0)
    for run_dir in run_dirs:
        best_alpha = max(record["alpha"] for record in records_of(run_dir, "eval"))
        assert f"<th>{run_dir.name}</th>" in table and f"{best_alpha:.4f} (epoch " in table
    assert "<td>world size</td><td>2</td><td>4</td>" in table


DECODED_PROBE = ('<script>window.addEventListener("load", () => { document.body.dataset.decoded = '
                 '[...document.querySelectorAll("img.cam")].map(i => i.complete && i.naturalWidth).join(","); });'
                 "</script>")
"""Added to a copy of a report (the report itself has no script): lists each overlay's decoded width."""


def decoded_overlay_widths(browser: str, tmp_path: Path, page: Path) -> list[int]:
    """Widths of the report's overlays as Chromium decoded them (0 or false for an image it could not decode)."""
    probe = tmp_path / f"probe-{page.parent.name}.html"
    probe.write_text(page.read_text().replace("</body>", DECODED_PROBE + "</body>"))
    dom = chromium(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    decoded = re.search(r'data-decoded="([^"]*)"', dom).group(1)
    return [int(width) if width.isdigit() else 0 for width in decoded.split(",") if width]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def chromium(browser: str, tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with no network chatter and a throwaway profile; returns stdout."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout


def load_cli(name: str):
    """Import launch/<name>.py as a module, so the test drives the real entry point."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> list[Path]:
    """Two real (tiny) training runs with different learning rates, as users compare them."""
    from conftest import write_shards

    root = tmp_path_factory.mktemp("real_runs")
    write_shards(root / "shards", "train", [30, 30], positive_every=3)
    write_shards(root / "shards", "val", [24], positive_every=3)
    runs = []
    for name, lr in (("lr_low", "1e-4"), ("lr_high", "3e-3")):
        result = subprocess.run([sys.executable, "-m", "dist_train.main", "--config", "configs/test_tiny.yaml",
                                 "--resume", "none", "--set", f"data.train_shards={root}/shards/train-*.tar",
                                 f"data.val_shards={root}/shards/val-*.tar", f"run_root={root}", f"name={name}",
                                 f"optim.lr={lr}", "tracking.html_report=true"],
                                capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(root / name)
    return runs


def test_compare_and_report_on_real_run_directories(real_runs, tmp_path):
    for run_dir in real_runs:
        assert (run_dir / "report.html").stat().st_size > 10_000, "each run writes its own report"
    compared = subprocess.run([sys.executable, "launch/compare.py", *map(str, real_runs), "--markdown"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
    assert compared.returncode == 0, compared.stderr[-2000:]
    out = tmp_path / "report.html"
    subprocess.run([sys.executable, "launch/report.py", *map(str, real_runs), "--out", str(out)], check=True,
                   capture_output=True, cwd=REPO, timeout=120)
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found: run tests/install_test_deps.sh (apt-get install -y chromium)")
    table = re.search(r'<table id="comparison">.*?</table>', chromium(browser, tmp_path, "--dump-dom", out.as_uri()),
                      re.S).group(0)
    for run_dir in real_runs:
        evals = records_of(run_dir, "eval")
        best = max(evals, key=lambda record: record["alpha"])
        figure = f"{best['alpha']:.4f} (epoch {best['epoch']})"
        assert figure in compared.stdout and figure in table, (figure, run_dir.name)
    assert "| optim.lr | 0.0001 | 0.003 |" in compared.stdout


def test_real_runs_show_decoded_overlays_of_their_chosen_cases(real_runs, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found: run tests/install_test_deps.sh (apt-get install -y chromium)")
    for page in [run_dir / "report.html" for run_dir in real_runs]:  # written by the Trainer at the end
        text = page.read_text()
        expected = len(re.findall(r'<img alt="Grad-CAM (true positive|false negative|false positive) ', text))
        assert 1 <= expected <= 9 and "Most confident true positives" in text, page
        assert decoded_overlay_widths(browser, tmp_path, page) == [384] * expected, page
