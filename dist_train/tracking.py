"""Rank-0 experiment tracking: a local metrics.jsonl that always exists, wandb when asked, progress output.

Only rank 0 tracks; on every other rank each method returns at once, so the loop calls them
unconditionally. The local file is the source of truth (reports and comparisons read it), and
wandb is an optional mirror: any wandb failure becomes a "warning" line and tracking continues
locally, because a dashboard outage must never stop or stall a training job.

metrics.jsonl holds one JSON object per line: {"kind": "train" | "eval" | <event kind> | "summary",
"step": optimizer step, "time": unix seconds, ...the record}; "kind", "step" and "time" are reserved.
Non-finite floats are written as null and numpy/torch values as plain numbers, so any JSON reader
can load it. In wandb, train records appear as train/<key>, eval records as val/<key> ("val_"
prefix dropped, so val_loss is val/loss), events as <kind>/<key>, lists as <key>/<index>; text is
kept out of the wandb history (it stays in the file), and the x-axis is "trainer/step".

wandb is imported only when `tracking.wandb.enabled` is true. The run id is chosen here and kept
by the loop in its checkpoints, so a requeued job resumes the same wandb run instead of starting
a new one (`resume="allow"` without an id does the latter).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dist_train.config import Config, to_dict
from dist_train.redact import scrub_secrets, secret_values
from dist_train.train.distributed import DistEnv

_WANDB_INIT_TIMEOUT_S = 60
"""An online init that cannot reach the server gives up after this long and tracking goes local."""
_PLAIN_LINES_PER_BAR = 20
"""Plain (non-TTY) progress prints about this many lines over a bar's total."""
_PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


# ---------------------------------------------------------------- the local history file


def _loggable(value: Any) -> Any:
    """Plain JSON for logs: numpy/torch scalars and arrays as numbers and lists, non-finite floats as null.

    Lossy on purpose (a log is read, not restored); checkpoints use the lossless `train.checkpoint.encode`."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _loggable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_loggable(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def truncate_history(path: Path, resume_step: int) -> int:
    """Drop the lines logged after `resume_step` (and earlier summaries); returns how many were dropped.

    Those lines describe work the resumed run repeats, so keeping them would duplicate steps.
    A half-written last line from a killed process is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] <= resume_step and record["kind"] != "summary"
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    path.write_text("".join(f"{line}\n" for line in kept))
    return dropped


# ---------------------------------------------------------------- wandb


def has_wandb_credentials() -> bool:
    """An API key in the environment, or a netrc entry for the wandb host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def _flatten_numbers(prefix: str, record: dict[Any, Any]) -> dict[str, float]:
    """wandb history keys: numbers kept, lists of numbers (per-group LRs) as key/0, key/1; text dropped."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            flat.update(_flatten_numbers(f"{prefix}{key}/", dict(enumerate(value))))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


class _WandbSink:
    """The wandb run; every call is guarded, and the first failure turns the sink off with one warning."""

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None, secrets: list[str], warn):
        self.run, self._warn = None, warn
        try:
            self.run = self._init(cfg, run_dir, run_id, secrets)
        except Exception as error:  # any wandb failure must leave training running
            self._fail("init", error)

    @staticmethod
    def _init(cfg: Config, run_dir: Path, run_id: str | None, secrets: list[str]):
        import wandb

        settings = cfg.tracking.wandb
        mode = settings.mode
        if mode == "auto":
            mode = "online" if has_wandb_credentials() else "offline"
        named = scrub_secrets({"project": settings.project, "entity": settings.entity, "group": settings.group,
                               "tags": list(settings.tags) or None, "name": settings.name or cfg.name}, secrets)
        # x_disable_meta: wandb would otherwise record the command line, where a secret may sit in --set
        run = wandb.init(**named, dir=str(run_dir), config=scrub_secrets(to_dict(cfg), secrets), id=run_id,
                         resume="allow", mode=mode,
                         settings=wandb.Settings(init_timeout=_WANDB_INIT_TIMEOUT_S, x_disable_meta=True))
        run.define_metric("trainer/step")
        run.define_metric("*", step_metric="trainer/step")
        if mode == "offline" and settings.mode == "auto":
            print(f"wandb: no API key, logging offline; upload later with: wandb sync {Path(run.dir).parent}",
                  file=sys.stderr, flush=True)
        return run

    def _fail(self, action: str, error: Exception) -> None:
        self.run = None
        self._warn(f"wandb {action} failed, continuing with metrics.jsonl only: "
                   f"{type(error).__name__}: {error}")

    def log(self, step: int, values: dict[str, Any], image_path: Path | None = None) -> None:
        if self.run is None:
            return
        try:
            if image_path is not None and Path(image_path).is_file():
                import wandb

                values = {**values, "val/roc": wandb.Image(str(image_path))}
            self.run.log({**values, "trainer/step": step}, step=step)
        except Exception as error:
            self._fail("log", error)

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
        except Exception as error:
            self._fail("finish", error)
        self.run = None


# ---------------------------------------------------------------- progress


def _format_postfix(postfix: dict[str, Any]) -> dict[str, str]:
    def short(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(short(item) for item in value)
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return {key: short(value) for key, value in postfix.items()}


class Progress:
    """A progress display: `update(n=1, **postfix)` then `close()`; does nothing in mode 'none'."""

    def __init__(self, mode: str, total: int, initial: int = 0, desc: str = ""):
        self.mode, self.total, self.count, self.desc = mode, total, initial, desc
        self._bar, self._started = None, time.monotonic()
        self._initial = initial
        self._every = max(1, total // _PLAIN_LINES_PER_BAR)
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.mode == "none":
            return
        self.count += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(_format_postfix(postfix), refresh=False)
            self._bar.update(n)
        elif self.count % self._every < n or self.count >= self.total:
            self._print_line(postfix)

    def _print_line(self, postfix: dict[str, Any]) -> None:
        """One log line with tqdm's own meter text (count, elapsed, ETA, rate)."""
        from tqdm import tqdm

        postfix_text = ", ".join(f"{key}={value}" for key, value in _format_postfix(postfix).items())
        line = tqdm.format_meter(self.count, self.total, time.monotonic() - self._started, prefix=self.desc,
                                 postfix=postfix_text or None, initial=self._initial,
                                 bar_format=_PLAIN_FORMAT)
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _progress_mode(requested: str) -> str:
    if requested == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return requested


# ---------------------------------------------------------------- the tracker


class Tracker:
    """Logs train/eval/event records to run_dir/metrics.jsonl (and wandb when enabled), on rank 0 only."""

    def __init__(self, cfg: Config, run_dir: Path, env: DistEnv, run_id: str | None = None,
                 resume_step: int | None = None):
        self.cfg, self.run_dir, self.env = cfg, Path(run_dir), env
        self.run_id = run_id
        self._active = env.is_main
        self._step = resume_step or 0
        self._wandb: _WandbSink | None = None
        if not self._active:
            return
        self._secrets = secret_values()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_history(self.history_path, resume_step)
        self._history = self.history_path.open("a", buffering=1)
        if cfg.tracking.wandb.enabled:
            self._wandb = _WandbSink(cfg, self.run_dir, run_id, self._secrets, self._warn)
            self.run_id = self._wandb.run.id if self._wandb.run is not None else run_id

    def _write(self, kind: str, step: int, record: dict[str, Any]) -> None:
        line = {"kind": kind, "step": int(step), "time": time.time()}
        line.update((key, value) for key, value in record.items() if key not in line)
        self._history.write(json.dumps(scrub_secrets(_loggable(line), self._secrets)) + "\n")

    def _warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self._write("warning", self._step, {"message": message})

    def log_train(self, step: int, record: dict[str, Any]) -> None:
        """One optimizer step's figures (loss, lr per group, images_per_s, epoch, ...)."""
        if not self._active:
            return
        self._step = step
        self._write("train", step, record)
        if self._wandb is not None:
            self._wandb.log(step, _flatten_numbers("train/", _loggable(record)))

    def log_eval(self, step: int, record: dict[str, Any], roc_png: Path | None = None) -> None:
        """One evaluation's figures (metrics.compute_all plus val_loss, epoch, ...) and its ROC image."""
        if not self._active:
            return
        self._step = step
        self._write("eval", step, record)
        if self._wandb is not None:
            values = {key.removeprefix("val_"): value for key, value in _loggable(record).items()}
            self._wandb.log(step, _flatten_numbers("val/", values), image_path=roc_png)

    def log_event(self, kind: str, record: dict[str, Any]) -> None:
        """An event ("phase", "resume", "warning", "checkpoint"), at record['step'] or the last step."""
        if not self._active:
            return
        step = int(record.get("step", self._step))
        self._write(kind, step, record)
        if self._wandb is not None:
            self._wandb.log(step, _flatten_numbers(f"{kind}/", _loggable(record)))

    def progress(self, total: int, initial: int = 0, desc: str = "") -> Progress:
        """A progress display per tracking.progress; a silent one on non-main ranks."""
        mode = _progress_mode(self.cfg.tracking.progress) if self._active else "none"
        return Progress(mode, total, initial, desc)

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        """Write summary.json and a final "summary" line, close the wandb run with `exit_code`."""
        if not self._active:
            return
        self._active = False
        final = {**summary, "exit_code": exit_code, "run_id": self.run_id}
        final = scrub_secrets(_loggable(final), self._secrets)
        (self.run_dir / "summary.json").write_text(json.dumps(final, indent=2) + "\n")
        self._write("summary", self._step, final)
        if self._wandb is not None:
            self._wandb.finish({key: value for key, value in final.items() if value is not None}, exit_code)
        self._history.close()
