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
    assert f"--out {tmp_path} is a folder" in message and "report.html" in message


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
