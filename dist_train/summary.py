"""The table a finished run prints: its best figures, then where to look next (report, best
checkpoint, the export command), every value as a number or words a person reads, not a Python dict."""

from __future__ import annotations

from pathlib import Path

from dist_train.config import Config


def format_summary(summary: dict, cfg: Config) -> str:
    """The table printed at the end of a run: the best evaluation's figures, then where to look next."""
    best = summary.get("best_record") or {}
    run_dir = Path(summary.get("run_dir") or cfg.run_dir)
    rows = [(f"best {name}", _fmt(best.get(name))) for name in ("alpha", "beta", "auc")]
    rows += [("selected by", cfg.eval.metric), ("best epoch", _fmt(summary.get("best_epoch"))),
             ("epochs done", f"{_fmt(summary.get('epochs_done'))} of {cfg.train.epochs}"),
             ("optimizer steps", _count(summary.get("steps"))),
             ("first positive at epoch", _fmt(summary.get("epochs_to_first_positive"))),
             ("unfreeze phases", _phases(summary)), ("wall time", _duration(summary.get("wall_time_s"))),
             ("images per second", _fmt(summary.get("images_per_s"), digits=1)),
             ("world size", _fmt(summary.get("world_size"))), ("engine", _fmt(summary.get("engine"))),
             ("run directory", str(run_dir)), ("best checkpoint", _best_checkpoint(summary, run_dir)),
             ("report", _report(run_dir, cfg.tracking.html_report)), ("export", f"python launch/export.py {run_dir}")]
    width = max(len(name) for name, _ in rows)
    lines = ["", "run summary", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _phases(summary: dict) -> str:
    """`0 (all, 4,930,745 parameters) from epoch 0`, one per phase that ran, then those that never did."""
    ran = [f"{phase['phase']} ({phase['train']}, {_count(phase.get('trainable_params'))} parameters) from epoch "
           f"{phase.get('epoch', phase.get('from_epoch'))}" for phase in summary.get("phases_ran") or []]
    not_run = summary.get("phases_not_run") or []
    text = "; ".join(ran) or "none"
    return text + (f"; not reached: {', '.join(map(str, not_run))}" if not_run else "")


def _best_checkpoint(summary: dict, run_dir: Path) -> str:
    name = summary.get("best_checkpoint")
    return str(run_dir / "checkpoints" / name) if name else "none (no evaluation improved, or checkpoint.keep_best off)"


def _report(run_dir: Path, enabled: bool) -> str:
    report = run_dir / "report.html"
    if report.is_file():
        return str(report)
    why = "see the warning above" if enabled else "tracking.html_report: false"
    return f"not written ({why}); write it with: python launch/report.py {run_dir} --out {report}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
