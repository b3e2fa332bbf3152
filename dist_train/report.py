"""Run reports and comparisons, read from the files a run leaves behind (or from wandb).

A run directory holds config.yaml (the resolved config), metrics.jsonl (see dist_train.tracking),
summary.json and, once evaluated, predictions_val.csv (`scoring.PREDICTION_COLUMNS`). Everything here reads
those files only, so a report can be rebuilt from a copied run directory long after training,
on a machine without GPUs, wandb or network. The HTML report is one self-contained file (images
inlined as base64 PNG, no external CSS/JS/URLs) so that it survives being mailed or archived.

One section reads more than the run's files: the class-activation maps (`evaluation.cases`) load the
run's checkpoint on the CPU and its val shards. It is optional: a run without checkpoints or shards, or
any failure while mapping, drops that section with a note (and a logged warning), never the report.

Summary keys read for the comparison: wall_time_s, images_per_s, world_size, exit_code.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dist_train.errors import UserError, first_line
from dist_train.evaluation import metrics
from dist_train.evaluation.calibration import reliability
from dist_train.evaluation.scoring import PREDICTION_COLUMNS
from dist_train.tracking import has_wandb_credentials, scrub_secrets

if TYPE_CHECKING:
    from PIL.Image import Image

    from dist_train.evaluation.cases import Explained, RunExplanation

Rows = list[tuple[str, list[Any]]]
log = logging.getLogger(__name__)

CAMS_PER_CATEGORY = 3
"""Images mapped per category (most confident true positives, worst false negatives, worst false positives)."""


@dataclass
class RunData:
    """What one run left behind; `predictions` is (labels, scores) of the last evaluation, if written."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    predictions: tuple[np.ndarray, np.ndarray] | None = None
    config_text: str = ""
    path: Path | None = None
    """The run directory (None for a wandb run): what the class-activation maps are computed from."""

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record.get("kind") == kind]


class WandbUnavailable(UserError, RuntimeError):
    """wandb cannot be queried (no API key, no network, unknown project); the message is one line."""


# ---------------------------------------------------------------- reading runs


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
"""What a run leaves (config.yaml first, before any step): a folder with none of them is not a run."""


def not_run_dirs(paths: list[Path]) -> list[str]:
    """The paths report.py and compare.py must refuse: a typo'd or empty folder would give an empty report."""
    return [str(path) for path in paths if not any((Path(path) / name).is_file() for name in RUN_FILES)]


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; a file that is missing leaves its part empty rather than failing."""
    run_dir = Path(run_dir)
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config_text = config_path.read_text(errors="replace") if config_path.is_file() else ""
    return RunData(
        name=run_dir.name,
        config=_readable(config_path, lambda: yaml.safe_load(config_text)),
        records=read_history(run_dir / "metrics.jsonl"),
        summary=_readable(summary_path, lambda: json.loads(summary_path.read_text())),
        predictions=read_predictions(run_dir / "predictions_val.csv"),
        config_text=config_text,
        path=run_dir,
    )


def _readable(path: Path, read: Callable[[], Any]) -> dict[str, Any]:
    """A run file's mapping; {} when it is missing or (with a warning naming it) not what its name says."""
    if not path.is_file():
        return {}
    try:
        value = read()
    except (ValueError, yaml.YAMLError) as error:
        value = error
    if not isinstance(value, dict):
        reason = f"{type(value).__name__}: {first_line(value)}" if isinstance(value, Exception) else "not a mapping"
        log.warning("%s is unreadable (%s): left out of the report", path, reason)
        return {}
    return value


def read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a half-written last line (a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, likelihoods) of the scored rows; rows of samples that could not be scored are left out."""
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("likelihood") != ""]
    if not rows:
        return None
    try:
        return np.array([int(row["label"]) for row in rows]), np.array([float(row["likelihood"]) for row in rows])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: expected columns {','.join(PREDICTION_COLUMNS)} with numbers: {error}") from None


def load_wandb_runs(project: str, group: str | None = None, tags: list[str] | None = None) -> list[RunData]:
    """Runs of a wandb project (optionally one group / any of some tags), as RunData without predictions."""
    if not has_wandb_credentials():
        raise WandbUnavailable("no wandb API key (set WANDB_API_KEY or run `wandb login`); "
                               "compare local run directories instead")
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$in": list(tags)}
    try:
        import wandb

        return [_from_wandb(run) for run in wandb.Api(timeout=30).runs(project, filters=filters)]
    except Exception as error:  # network, auth and lookup errors all mean: cannot compare from wandb
        raise WandbUnavailable(f"cannot read wandb project {project!r}: {type(error).__name__}: "
                               f"{first_line(error)}") from None


def _from_wandb(run: Any) -> RunData:
    """Rebuild train/eval records from the history keys dist_train.tracking writes (train/*, val/*)."""
    records = []
    for row in run.scan_history():
        step = row.get("trainer/step", row.get("_step", 0))
        for kind, prefix in (("train", "train/"), ("eval", "val/")):
            values = {key[len(prefix):]: value for key, value in row.items()
                      if key.startswith(prefix) and "/" not in key[len(prefix):] and "." not in key}
            if values:
                if kind == "eval" and "loss" in values:
                    values["val_loss"] = values.pop("loss")
                records.append({"kind": kind, "step": step, "time": row.get("_timestamp"), **values})
    config = {key: value for key, value in dict(run.config).items() if not key.startswith("_")}
    summary = {key: value for key, value in dict(run.summary).items() if not key.startswith("_")}
    return RunData(name=run.name, config=config, records=records, summary=summary,
                   config_text=yaml.safe_dump(config, sort_keys=False))


# ---------------------------------------------------------------- comparison figures


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys; lists of mappings (unfreeze phases) indexed as key[i], other lists kept whole."""
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(config, list) and any(isinstance(item, dict) for item in config):
        flat = {}
        for index, item in enumerate(config):
            flat.update(flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: config}


def differing_config(runs: list[RunData]) -> dict[str, list[Any]]:
    """The config keys whose values are not the same in every run (the run name excepted)."""
    flats = [flatten(run.config) for run in runs]
    keys = sorted({key for flat in flats for key in flat} - {"name"})
    table = {key: [flat.get(key, "—") for flat in flats] for key in keys}
    return {key: values for key, values in table.items() if len({json.dumps(v, default=str) for v in values}) > 1}


def per_epoch(run: RunData, kind: str, key: str) -> dict[int, float]:
    """`key` per epoch: the mean of the epoch's train records, or the epoch's last evaluation."""
    grouped: dict[int, list[float]] = {}
    for record in run.of_kind(kind):
        value = record.get(key)
        if record.get("epoch") is not None and isinstance(value, (int, float)) and math.isfinite(value):
            grouped.setdefault(int(record["epoch"]), []).append(float(value))
    reduce = np.mean if kind == "train" else (lambda values: values[-1])
    return {epoch: float(reduce(values)) for epoch, values in sorted(grouped.items())}


def best_with_epoch(run: RunData, key: str) -> tuple[float, int] | None:
    """The best evaluation value of `key` and its epoch (the first epoch reaching it)."""
    values = per_epoch(run, "eval", key)
    if not values:
        return None
    epoch = max(values, key=lambda each: (values[each], -each))
    return values[epoch], epoch


def first_positive_epoch(run: RunData) -> int | None:
    """Epoch of the first evaluation predicting any positive (predicted_positives, else tp + fp)."""
    for record in run.of_kind("eval"):
        predicted = record.get("predicted_positives")
        if predicted is None and record.get("tp") is not None:
            predicted = record["tp"] + (record.get("fp") or 0)
        if predicted:
            return record.get("epoch")
    return None


def wall_time_s(run: RunData) -> float | None:
    """summary.json's wall_time_s, else the span of the history's timestamps."""
    if run.summary.get("wall_time_s") is not None:
        return float(run.summary["wall_time_s"])
    times = [record["time"] for record in run.records if isinstance(record.get("time"), (int, float))]
    return max(times) - min(times) if len(times) > 1 else None


def images_per_s(run: RunData) -> float | None:
    if run.summary.get("images_per_s") is not None:
        return float(run.summary["images_per_s"])
    rates = [record["images_per_s"] for record in run.of_kind("train") if record.get("images_per_s")]
    return float(np.mean(rates)) if rates else None


def compare_rows(runs: list[RunData]) -> Rows:
    """The comparison table: one (label, [value per run]) row each; values are raw, see `format_cell`."""
    rows: Rows = [(key, values) for key, values in differing_config(runs).items()]
    for key, label in (("alpha", "best α"), ("beta", "best β"), ("auc", "best AUC")):
        rows.append((label, [best_with_epoch(run, key) for run in runs]))
    rows += [
        ("first positive prediction (epoch)", [first_positive_epoch(run) for run in runs]),
        ("wall time", [_Duration(seconds) if seconds is not None else None for seconds in map(wall_time_s, runs)]),
        ("images/s", [images_per_s(run) for run in runs]),
        ("world size", [run.summary.get("world_size") for run in runs]),
        ("exit code", [run.summary.get("exit_code") for run in runs]),
    ]
    return rows


class _Duration(float):
    """Seconds, shown as h:mm:ss."""


def format_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, _Duration):
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]:.4f} (epoch {value[1]})"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return value if isinstance(value, str) else json.dumps(value, default=str)


def format_text(rows: Rows, names: list[str], markdown: bool = False) -> str:
    """An aligned terminal table, or a Markdown one."""
    table = [["", *names]] + [[label, *map(format_cell, values)] for label, values in rows]
    if markdown:
        lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
        return "\n".join([lines[0], "|" + " --- |" * len(names + [""]), *lines[1:]])
    widths = [max(len(row[column]) for row in table) for column in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


# ---------------------------------------------------------------- figures


def plot_curves(runs: list[RunData], val_keys: tuple[str, ...] = ("alpha", "beta", "auc")) -> Figure:
    """Train loss per epoch beside the validation metrics per epoch, one colour per run."""
    figure = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    loss_axes, val_axes = figure.subplots(1, 2)
    styles = {"alpha": "-", "beta": "--", "auc": ":"}
    for index, run in enumerate(runs):
        colour = f"C{index}"
        loss = per_epoch(run, "train", "loss")
        loss_axes.plot(list(loss), list(loss.values()), marker=".", color=colour, label=run.name)
        for key in val_keys:
            values = per_epoch(run, "eval", key)
            val_axes.plot(list(values), list(values.values()), styles.get(key, "-"), marker=".", color=colour,
                          label=f"{run.name} {key}")
    loss_axes.set(title="train loss (epoch mean)", xlabel="epoch", ylabel="loss")
    val_axes.set(title="validation " + " / ".join(val_keys), xlabel="epoch", ylim=(0, 1.02))
    for axes in (loss_axes, val_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def plot_score_distribution(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Figure:
    """Predicted likelihood per class (densities: positives are 1–3 %), with the β threshold."""
    figure = Figure(figsize=(5.5, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    bins = np.linspace(scores.min(), scores.max(), 41) if scores.max() > scores.min() else 10
    for label, name, colour in ((0, "no referable glaucoma", "tab:blue"), (1, "referable glaucoma", "tab:red")):
        if (labels == label).any():
            # matplotlib's stub types bins as a Sequence; an array of edges is what its docs ask for
            axes.hist(scores[labels == label], bins=bins, density=True, alpha=0.55, color=colour,  # type: ignore[arg-type]
                      label=f"{name} (n={int((labels == label).sum())})")
    if math.isfinite(threshold):
        axes.axvline(threshold, color="black", linestyle="--", label=f"β threshold {threshold:.4g}")
    axes.set(title="predicted likelihood per class", xlabel="score", ylabel="density")
    axes.legend(fontsize="small")
    return figure


def plot_reliability(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> tuple[Figure, float]:
    """The reliability diagram (observed positive fraction per likelihood bin, against the diagonal) with
    each bin's image count below, and the ECE it shows."""
    curve = reliability(labels, scores, bins)
    figure = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
    diagram, counts = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    diagram.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    diagram.plot(curve.predicted, curve.observed, "o-", color="tab:red", label=f"this model (ECE {curve.ece:.3f})")
    diagram.set(title="reliability diagram", ylabel="observed fraction referable", xlim=(0, 1), ylim=(0, 1))
    diagram.legend(fontsize="small", loc="upper left")
    diagram.grid(alpha=0.3)
    counts.bar(curve.predicted, curve.counts, width=0.8 / bins, color="tab:grey")
    counts.set(xlabel="mean predicted likelihood in the bin", ylabel="images", yscale="log")
    return figure, curve.ece


def plot_comparison(runs: list[RunData], path: Path) -> Path:
    """compare.py's PNG: val α and train loss per epoch, runs overlaid."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, val_keys=("alpha",)).savefig(path, format="png")
    return Path(path)


def _png_tag(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _img_tag(buffer.getvalue(), alt)


def _img_tag(png: bytes, alt: str, css_class: str = "") -> str:
    encoded = base64.b64encode(png).decode()
    classes = f' class="{css_class}"' if css_class else ""
    return f'<img alt="{html.escape(alt)}"{classes} src="data:image/png;base64,{encoded}">'


# ---------------------------------------------------------------- HTML


_STYLE = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:left}th{background:#eef}img{max-width:100%}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}section{margin-bottom:32px}
figure{display:inline-block;margin:4px 8px 8px 0;font-size:12px}.cases{display:flex;flex-wrap:wrap}"""


def _html_table(header: list[str], body: list[list[Any]], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(cell))}</td>" for cell in row) + "</tr>"
                   for row in body)
    identifier = f' id="{table_id}"' if table_id else ""
    return f"<table{identifier}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _prediction_section(run: RunData) -> str:
    if run.predictions is None:
        return "<p>No predictions_val.csv: ROC, confusion matrix and score distribution skipped.</p>"
    labels, scores = run.predictions
    figures = metrics.compute_all(labels, scores)
    roc = Figure(figsize=(5.5, 5), dpi=100, layout="constrained")
    metrics.draw_roc(roc.add_subplot(), labels, scores)
    confusion = _html_table(["at β threshold " + format_cell(figures["beta_threshold"]), "predicted negative",
                             "predicted positive"],
                            [["actual negative", figures["tn"], figures["fp"]],
                             ["actual positive", figures["fn"], figures["tp"]]])
    distribution = plot_score_distribution(labels, scores, float(cast(float, figures["beta_threshold"])))
    calibration, ece = plot_reliability(labels, scores)
    return (f"<h3>Last evaluation ({figures['n']} images, {figures['positives']} positive)</h3>"
            f"{_png_tag(roc, 'ROC curve')}{_png_tag(distribution, 'score distribution')}"
            f"<h3>Confusion matrix at the β threshold</h3>{confusion}"
            f"<h3>Calibration</h3><p>Expected calibration error (10 equal-width bins): "
            f'<span id="ece-{html.escape(run.name)}">{ece:.4f}</span></p>'
            f"{_png_tag(calibration, 'reliability diagram')}")


def _phases_section(run: RunData) -> str:
    phases = run.of_kind("phase")
    if not phases:
        return "<p>No unfreeze phase events.</p>"
    keys = [key for key in dict.fromkeys(key for phase in phases for key in phase) if key not in ("kind", "time")]
    return _html_table(keys, [[phase.get(key) for key in keys] for phase in phases])


_CATEGORY_TITLES = {"true positive": "Most confident true positives", "false negative": "Worst false negatives",
                    "false positive": "Worst false positives"}


def _cam_section(run: RunData, cams: int) -> str:
    """Grad-CAM overlays of the chosen cases, or one note saying why there are none (never an exception)."""
    if cams <= 0:
        return ""
    title = "<h3>What the model looks at</h3>"
    if run.path is None:
        return f"{title}<p>No class-activation maps: the run has no local directory.</p>"
    from dist_train.evaluation.cases import NothingToExplain, explain_run  # torch and grad-cam only when used

    try:
        explanation = explain_run(run.path, cams)
    except NothingToExplain as reason:
        return f"{title}<p>No class-activation maps: {html.escape(str(reason))}.</p>"
    except Exception as error:  # the maps are an extra: any failure drops this section, not the report
        log.warning("report: class-activation maps of %s skipped: %s: %s", run.name, type(error).__name__,
                    first_line(error))
        return (f"{title}<p>Class-activation maps skipped: {html.escape(type(error).__name__)}: "
                f"{html.escape(first_line(error))}.</p>")
    return title + _cam_figures(explanation)


def _cam_figures(explanation: RunExplanation) -> str:
    """One row of figures per category: the image the model saw beside its Grad-CAM overlay."""
    from dist_train.evaluation.explain import side_by_side

    parts = [f"<p>Grad-CAM of the referable-glaucoma logit at <code>{html.escape(explanation.layer)}</code> of the "
             f"checkpoint that wrote {html.escape(explanation.predictions)}; cases split at its β threshold "
             f"{explanation.threshold:.4g} (left: the input as the model saw it, right: the map, red = more).</p>"]
    for category, heading in _CATEGORY_TITLES.items():
        chosen = [item for item in explanation.cases if item.case.category == category]
        figures = "".join(_cam_figure(item, side_by_side(item.rgb, item.cam)) for item in chosen)
        parts.append(f"<h4>{heading}</h4>" + (f'<div class="cases">{figures}</div>' if chosen
                                                else "<p>None at this threshold.</p>"))
    if explanation.missing:
        parts.append(f"<p>Not in the val shards: {html.escape(', '.join(explanation.missing))}.</p>")
    return "".join(parts)


def _cam_figure(item: Explained, picture: Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    case = item.case
    caption = f"{case.key}: label {case.label}, likelihood {case.likelihood:.4f}"
    return (f"<figure>{_img_tag(buffer.getvalue(), f'Grad-CAM {case.category} {case.key}', 'cam')}"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _run_section(run: RunData, cams: int) -> str:
    config_text = html.escape(run.config_text or "(no config.yaml)")
    return (f'<section><h2>{html.escape(run.name)}</h2>{_prediction_section(run)}{_cam_section(run, cams)}'
            f"<h3>Unfreeze phases</h3>{_phases_section(run)}"
            f"<h3>Resolved config</h3><details><summary>config.yaml</summary><pre>{config_text}</pre></details>"
            "</section>")


def render_html(runs: list[RunData], cams: int = CAMS_PER_CATEGORY) -> str:
    names = [run.name for run in runs]
    rows = compare_rows(runs)
    comparison = _html_table(["", *names], [[label, *values] for label, values in rows], table_id="comparison")
    body = (f"<h1>dist_train report: {html.escape(', '.join(names))}</h1>"
            f"<section><h2>Comparison</h2>{comparison}</section>"
            f"<section><h2>Training curves</h2>{_png_tag(plot_curves(runs), 'training curves')}</section>"
            + "".join(_run_section(run, cams) for run in runs))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>dist_train report</title>'
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")
    return scrub_secrets(page)


def write_report(run_dirs: list[Path], out: Path, cams: int = CAMS_PER_CATEGORY) -> Path:
    """Write the self-contained HTML report of `run_dirs` to `out` (the loop calls this on rank 0 at the end);
    `cams` images per category get class-activation maps (0: no maps, nothing but the run's files read)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html([load_run(Path(run_dir)) for run_dir in run_dirs], cams), encoding="utf-8")
    return out
