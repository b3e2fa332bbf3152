"""launch/report.py and launch/compare.py refuse a folder that is not a run before writing anything:
a typo'd path used to give an empty report and exit 0."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO


def load_cli(name: str):
    """launch/<name>.py as a module: the test drives the real entry point."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}_cli", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(capsys, name: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as leaving:
        load_cli(name).main(argv)
    assert leaving.value.code == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.mark.parametrize("name", ["report", "compare"])
def test_a_folder_that_is_no_run_is_refused(tmp_path, capsys, name):
    (tmp_path / "typo").mkdir()
    out = tmp_path / "report.html"
    argv = [str(tmp_path / "typo")] + (["--out", str(out)] if name == "report" else [])
    message = refused(capsys, name, argv)
    assert "not a run directory" in message and str(tmp_path / "typo") in message
    assert not out.exists()


def test_report_out_that_is_a_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    message = refused(capsys, "report", [str(run), "--out", str(tmp_path)])
    assert f"--out {tmp_path}: is a folder" in message and "report.html" in message


def test_a_negative_cams_count_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    out = tmp_path / "report.html"
    message = refused(capsys, "report", [str(run), "--out", str(out), "--cams", "-1"])
    assert "--cams -1" in message and "0 (no maps)" in message
    assert not out.exists()


def test_cams_zero_writes_the_report_without_the_maps_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    out = tmp_path / "report.html"
    assert load_cli("report").main([str(run), "--out", str(out), "--cams", "0"]) == 0
    with_maps = tmp_path / "with.html"
    assert load_cli("report").main([str(run), "--out", str(with_maps)]) == 0
    assert "What the model looks at" not in out.read_text()
    assert "No class-activation maps: run has no checkpoint" in with_maps.read_text()


def run_with_history(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text('{"kind": "eval", "step": 1, "time": 0, "alpha": 0.5}\n')
    (run / "summary.json").write_text('{"best_alpha": 0.5}\n')
    return run


@pytest.mark.parametrize("name, option, target", [("report", "--out", "metrics.jsonl"),
                                                   ("compare", "--plot", "summary.json")])
def test_a_run_file_given_as_the_output_is_refused_and_kept(tmp_path, capsys, name, option, target):
    """Before, report.py --out run/metrics.jsonl replaced the run's history with HTML, and compare.py
    --plot run/summary.json wrote a PNG over it; both exited 0. The oracle is the file's bytes."""
    run = run_with_history(tmp_path)
    before = (run / target).read_bytes()
    message = refused(capsys, name, [str(run), option, str(run / target)])
    assert f"{option} {run / target}" in message and (".html" if name == "report" else ".png") in message
    assert (run / target).read_bytes() == before


@pytest.mark.parametrize("name, option, leaf", [("report", "--out", "r.html"), ("compare", "--plot", "c.png")])
def test_an_output_under_a_file_is_refused_in_one_line(tmp_path, capsys, name, option, leaf):
    """Before: FileExistsError/NotADirectoryError tracebacks (compare's after printing its table)."""
    run = run_with_history(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("in the way")
    message = refused(capsys, name, [str(run), option, str(blocker / leaf)])
    assert f"{blocker} is a file, not a folder" in message
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", ["report", "compare"])
def test_a_corrupt_config_or_summary_is_left_out_with_a_warning(tmp_path, caplog, name):
    """Before: yaml.ParserError / JSONDecodeError tracebacks, where a truncated metrics.jsonl was tolerated.
    (The warning reaches stderr through logging's last-resort handler; pytest captures it as a record.)"""
    run = run_with_history(tmp_path)
    (run / "config.yaml").write_text("train: {epochs: [1\n")
    (run / "summary.json").write_bytes(b"\x89PNG\r\n\x1a\n not json")
    argv = [str(run)] + (["--out", str(tmp_path / "r.html"), "--cams", "0"] if name == "report" else [])
    with caplog.at_level("WARNING", logger="dist_train.report"):
        assert load_cli(name).main(argv) == 0
    said = " ".join(record.getMessage() for record in caplog.records)
    assert f"{run / 'config.yaml'} is unreadable" in said and f"{run / 'summary.json'} is unreadable" in said
