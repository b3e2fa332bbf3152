"""The training loop, top to bottom: build, resume, then per epoch train, evaluate, checkpoint.

Each part lives in its own module; this file only says in what order they run and what state moves
between them. An epoch is an outer loop over optimizer steps and an inner loop over the micro-batches
of one accumulation window. Rank 0 alone tracks and decides (best checkpoint, early stopping,
health); its `Decision` reaches the other ranks through one broadcast per evaluation.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from dist_train import faults
from dist_train.config import Config, to_dict
from dist_train.data.augment import Normaliser
from dist_train.data.gpu_decode import DeviceDecoder, run_decoders, size_warning
from dist_train.data.manifest import shard_preprocessing, split_counts, verify_against_manifest
from dist_train.data.preprocess import clahe_plan, upsampling_warning
from dist_train.data.stream import (
    Batch,
    EvalStream,
    TrainStream,
    shard_urls,
    steps_per_epoch,
)
from dist_train.errors import DataError, DistTrainError, TrainingStopped, one_line
from dist_train.evaluation import metrics, scoring
from dist_train.model.losses import build_loss
from dist_train.model.network import build_model, prepare_model
from dist_train.model.optim import (
    LRSchedule,
    build_optimizer,
    global_batch_size,
    lr_scale,
    lr_scaling_warning,
    phase_peak_lrs,
    restore_settings,
)
from dist_train.model.unfreeze import UnfreezeSchedule
from dist_train.redact import scrub_secrets
from dist_train.tracking import Tracker
from dist_train.train import distributed, preemption
from dist_train.train.bad_samples import BadSamples
from dist_train.train.checkpoint import Checkpointer, checkpoint_name, read_trainer_state
from dist_train.train.decisions import decide, patience_spent
from dist_train.train.distributed import DistEnv
from dist_train.train.engine import build_engine
from dist_train.train.epoch_stats import EpochStats, EpochSums
from dist_train.train.health import val_loss_rising
from dist_train.train.loader import training_loader
from dist_train.train.state import Decision, RNGState, Stateful, Stop, StreamState, TrainerState
from dist_train.train.step_flags import NonFiniteLoss, StepFlags

log = logging.getLogger(__name__)

LoaderFactory = Callable[..., Iterable[Batch]]
"""`make_loader`'s signature: (dataset, data config, pin_memory, timeout_s) -> an iterable of Batch."""


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, resume_from: Path | None = None, *,
                 loader_factory: LoaderFactory = training_loader, config_changes: list[str] | None = None):
        """`config_changes`: how this run's config differs from the checkpoint's (resume_check), for the log."""
        self.cfg, self.env, self.run_dir = cfg, env, cfg.run_dir
        self.loader_factory, self.config_changes = loader_factory, config_changes or []
        self.started = time.monotonic()
        distributed.seed_everything(cfg.train.seed + env.rank, cfg.train.deterministic)
        distributed.configure_backends(env.device, cfg.train.deterministic)
        self.train_urls = shard_urls(cfg.data.train_shards)
        self.val_urls = shard_urls(cfg.data.val_shards)
        if cfg.data.verify_shards:
            self._verify_shards()
        self.train_counts = split_counts(self.train_urls, cfg.data.manifest, self.run_dir / "cache")
        self.val_counts = split_counts(self.val_urls, cfg.data.manifest, self.run_dir / "cache")
        self.shard_preprocessing = shard_preprocessing(self.train_urls, cfg.data.manifest)
        self.steps_per_epoch = cfg.train.steps_per_epoch or steps_per_epoch(
            self.train_counts.samples, env.world_size, cfg.train.batch_size, cfg.train.accumulation_steps)
        self.model = prepare_model(build_model(cfg.model, image_size=cfg.data.image_size), cfg.model, env.device)
        self.unfreeze = UnfreezeSchedule(cfg.unfreeze, self.model)
        self.global_batch = global_batch_size(cfg.train.batch_size, cfg.train.accumulation_steps, env.world_size)
        self.batch_scale = lr_scale(cfg.optim, self.global_batch)
        self.warnings = [w for w in (lr_scaling_warning(cfg.optim, self.global_batch),
                                     upsampling_warning(self.shard_preprocessing, cfg.data.image_size),
                                     size_warning(cfg.data, self.shard_preprocessing)) if w]
        optimizer = build_optimizer(self.model, self.unfreeze, cfg.optim, self.batch_scale)
        negatives = self.train_counts.samples - self.train_counts.positives
        self.loss_fn = build_loss(cfg.loss, self.train_counts.positives, negatives)
        self.engine = build_engine(self.model, optimizer, cfg, env)
        self.lr_schedule = LRSchedule(self.engine.optimizer, cfg.schedule, cfg.unfreeze.phases,
                                      self.steps_per_epoch, cfg.train.epochs, batch_scale=self.batch_scale)
        mean, std = tuple(self.model.data_config["mean"]), tuple(self.model.data_config["std"])
        self.normalise = Normaliser(mean, std, env.device)
        self.device_decode = DeviceDecoder(cfg.data.image_size, cfg.data.augment.interpolation, env.device)
        clahe = clahe_plan(cfg.data, self.train_urls, self.val_urls).in_decoder
        self.decoders = run_decoders(cfg.data, mean, std, clahe, env.device)
        self.state, self.stream, self.rng = TrainerState(), StreamState(), RNGState()
        self.bad_samples = BadSamples(env, self.train_counts.samples, cfg.data.max_bad_fraction)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", env, cfg.checkpoint.keep_last)
        saved = self._resume(resume_from) if resume_from else None
        self.wall_base = self.state.wall_time_s
        self.tracker = Tracker(cfg, self.run_dir, env, run_id=saved.get("run_id") if saved else None,
                               resume_step=self.state.step if saved else None)
        self._announce(resume_from, saved)

    def _verify_shards(self) -> None:
        """Every rank hashes its share of the shards; every rank learns the whole verdict."""
        mine = verify_against_manifest(self.train_urls + self.val_urls, self.cfg.data.manifest,
                                       share=(self.env.rank, self.env.world_size))
        problems = distributed.problems_of_all(self.env, mine)
        if problems:
            raise DataError(f"shard verification failed for {len(problems)} shard(s): {problems[0]}")

    # ------------------------------------------------------------ the run

    def train(self) -> dict[str, Any]:
        """Train from the current state to the last epoch (or an early stop); returns the summary."""
        exit_code, preempted = 1, False
        done = self._already_done()
        if done:
            log.warning("%s, so nothing is trained: %s, or pass --resume none to start again", *done)
        try:
            for epoch in range(self.state.epoch, self.cfg.train.epochs if done is None else self.state.epoch):
                stats = self.train_epoch(epoch)
                if self._end_epoch(epoch, stats):
                    break
            exit_code = 0
            return self.summary()
        except preemption.Preempted:
            exit_code, preempted = 0, True
            raise
        finally:
            self.tracker.finish(self.summary(), exit_code=exit_code)
            if self.env.is_main and self.cfg.tracking.html_report and not preempted:
                self._write_report()  # not in a preemption's grace period: the requeued run writes it

    def _already_done(self) -> tuple[str, str] | None:
        """(what ended this run, how to train on) when a resumed run has nothing left to train: every epoch
        trained, or the early-stopping rule met by the restored count (as it would stop the next epoch)."""
        if self.state.epoch >= self.cfg.train.epochs:
            return f"this run has trained all {self.cfg.train.epochs} epochs (train.epochs) already", \
                "raise train.epochs to train on"
        if self.state.epoch > 0 and patience_spent(self.state, self.cfg):
            return (f"this run stopped early after epoch {self.state.epoch - 1} ({self.cfg.eval.metric} did not "
                    f"improve for {self.state.evals_without_improvement} evaluations, "
                    f"eval.early_stopping_patience={self.cfg.eval.early_stopping_patience})"), \
                "raise eval.early_stopping_patience to train on"
        return None

    def _write_report(self) -> None:
        """The self-contained HTML report; a failure here must not fail a finished run."""
        from dist_train.report import write_report

        try:
            write_report([self.run_dir], self.run_dir / "report.html")
        except Exception as error:  # the report is a convenience; the run's files are the record
            log.warning("could not write report.html: %s", error)

    def train_epoch(self, epoch: int) -> EpochStats:
        """The rest of `epoch`: from the stream's position to the epoch's last optimizer step."""
        self.enter_phase(epoch)
        done = self.state.step - self.state.epoch_start_step
        return self.run_steps(epoch, self.steps_per_epoch - done)

    def run_steps(self, epoch: int, steps: int) -> EpochStats:
        """Up to `steps` optimizer steps of `epoch` from the stream's position (benchmarks time this)."""
        sums = EpochSums(self.env.device)
        progress = self.tracker.progress(self.steps_per_epoch, self.state.step - self.state.epoch_start_step,
                                         desc=f"epoch {epoch}")
        self.engine.module.train()
        self.unfreeze.set_train_mode(self.engine.module)
        batches = self._micro_batches(epoch) if steps > 0 else iter(())
        flags = StepFlags(self.env, late=self.engine.gates_on_device)
        window_start, window_samples, shown_step = time.monotonic(), 0, self.state.step
        for _ in range(steps):
            faults.point(f"train.step.{self.state.step + 1}")
            self.lr_schedule.step(self._schedule_step(epoch), epoch)
            window = self._accumulate(batches, sums)
            if window is None:
                break
            loss, samples, non_finite = window
            preempted = self._apply_update(flags, non_finite)
            self.state.step += 1
            window_samples += samples
            log_now = self.state.step % self.cfg.train.log_every_steps == 0  # float(loss) waits for the GPU anyway
            if preempted or log_now or self._checkpoint_may_follow():
                preempted = self._check_window(flags) or preempted
            if preempted:
                self._preempt(f"preemption notice: checkpointing at step {self.state.step}")
            if log_now:
                rate = window_samples * self.env.world_size / max(time.monotonic() - window_start, 1e-9)
                self._log_train(epoch, float(loss), rate)
                progress.update(self.state.step - shown_step, loss=float(loss), img_s=round(rate, 1))
                window_start, window_samples, shown_step = time.monotonic(), 0, self.state.step
            self._maybe_checkpoint_mid_epoch()
        if self._check_window(flags):
            self._preempt(f"preemption notice: checkpointing at step {self.state.step}")
        if self.state.step > shown_step:
            progress.update(self.state.step - shown_step)
        progress.close()
        return sums.reduced(self.env)

    def _accumulate(self, batches: Iterator[Batch],
                    sums: EpochSums) -> tuple[torch.Tensor, int, torch.Tensor] | None:
        """Forward and backward every micro-batch of one accumulation window; None when the stream ended.

        Returns the window's last loss, its sample count and whether any loss was non-finite (kept on
        the device: nothing here waits for the GPU)."""
        accumulation = self.cfg.train.accumulation_steps
        non_finite = torch.zeros((), dtype=torch.bool, device=self.env.device)
        samples, loss = 0, torch.zeros(())
        for micro in range(accumulation):
            batch = next(batches, None)
            if batch is None:
                if micro:
                    raise RuntimeError(f"the training stream ended inside an accumulation window "
                                       f"({micro} of {accumulation} micro-batches)")
                return None
            images = self.normalise(batch.images.to(self.env.device, non_blocking=True))
            labels = batch.labels.to(self.env.device, non_blocking=True)
            logits, loss = self.engine.forward_backward(images, labels, self.loss_fn, sync=micro == accumulation - 1)
            loss = faults.corrupt_loss(loss, self.state.step + 1)
            non_finite |= ~torch.isfinite(loss)
            self.stream.position.advance(batch)
            sums.add(logits, labels, loss)
            samples += len(batch.keys)
        return loss, samples, non_finite

    def _micro_batches(self, epoch: int) -> Iterator[Batch]:
        """This rank's non-empty micro-batches of `epoch` from the saved position; corrupt samples counted."""
        micro_batches = self.steps_per_epoch * self.cfg.train.accumulation_steps
        stream = TrainStream(self.train_urls, self.cfg.data, self.decoders["train"], self.cfg.train.batch_size,
                             self.env.rank, self.env.world_size, self.cfg.train.seed, epoch, micro_batches,
                             self.cfg.data.workers, resume=self.stream.position,
                             shard_samples=self.train_counts.per_shard)
        pin_memory = self.cfg.data.pin_memory and self.env.device.type == "cuda"
        for batch in self.loader_factory(stream, self.cfg.data, pin_memory, self.cfg.engine.timeout_s):
            batch = self.device_decode.training_batch(batch)  # data.decode=cuda: its corrupt samples count below
            self.bad_samples.note(batch)
            if batch.keys:
                yield batch

    def _apply_update(self, flags: StepFlags, non_finite: torch.Tensor) -> bool:
        """The window's update; True when a flag read here carried a preemption notice.

        An engine that gates on the device gets its update queued behind "no rank's loss was non-finite
        at this step or an unread earlier one", and the previous step's flags are read only after it:
        the host never waits for the step it has just queued. Other engines read this step's flags
        before its update, so a bad update is never issued."""
        skip = flags.add(self.state.step + 1, non_finite)
        if skip is None:
            preempted = self._check_window(flags)
            self.engine.optimizer_step()
            return preempted
        self.engine.optimizer_step(skip)
        return self._check_window(flags, keep_last=True)

    def _check_window(self, flags: StepFlags, keep_last: bool = False) -> bool:
        """Read the unread step flags (see step_flags.py); True on a preemption notice on any rank.

        A non-finite loss on any rank stops every rank. Its update, and any queued after it, were skipped
        (or never issued), so the weights and the optimizer state are those after the step before it, and
        `state.step` is set back to say so; the last good and best checkpoints are untouched. A notice
        (SLURM signals may reach only some ranks) makes all checkpoint together after the current step.
        """
        try:
            return flags.settle(keep_last)
        except NonFiniteLoss as bad:
            self.state.step = bad.step - 1
            raise TrainingStopped(f"non-finite loss at optimizer step {bad.step}; the last good and best "
                                  f"checkpoints are untouched. Lower optim.lr or set optim.grad_clip.") from None

    def _checkpoint_may_follow(self) -> bool:
        """Whether `_maybe_checkpoint_mid_epoch` may save after this step: no checkpoint holds unread flags."""
        every = self.cfg.checkpoint.every_steps
        return every is not None and every > 0 and self.state.step % every == 0

    def _schedule_step(self, epoch: int) -> int:
        """How far training has got, in optimizer steps of this run's epoch length.

        The same as `state.step` unless the run resumed on another world size, where `state.step`
        still counts the steps of both layouts (it names checkpoints and orders the logs)."""
        return epoch * self.steps_per_epoch + self.state.step - self.state.epoch_start_step

    def _maybe_checkpoint_mid_epoch(self) -> None:
        every = self.cfg.checkpoint.every_steps
        in_epoch = self.state.step - self.state.epoch_start_step
        if every and self.state.step % every == 0 and in_epoch < self.steps_per_epoch:
            self.save_checkpoint()

    # ------------------------------------------------------------ the end of an epoch

    def _end_epoch(self, epoch: int, stats: EpochStats) -> bool:
        """Evaluate, pick the best, apply health rules and checkpoint; True when training should stop.

        A preemption notice is looked for before evaluation, after it and after the checkpoint, so a
        notice that lands during a long evaluation (5-crop TTA) is not left for the next epoch's
        first step. A notice before evaluation checkpoints the finished epoch as not yet evaluated:
        the resumed run evaluates it first.
        """
        self.state.seen_samples += stats.samples
        self.state.bad_samples = max(self.state.bad_samples, self.bad_samples.end_epoch())
        if self._notice():
            self._preempt(f"preemption notice after epoch {epoch}'s training: checkpointing before evaluation")
        self.state.epoch, self.state.epoch_start_step = epoch + 1, self.state.step
        self.stream.reset()
        decision = Decision()
        if (epoch + 1) % self.cfg.eval.every_epochs == 0 or epoch == self.cfg.train.epochs - 1:
            decision = self._evaluate_and_decide(epoch, stats)
        notice = self._notice()
        best = decision.improved and self.cfg.checkpoint.keep_best
        if best:  # before the save: the checkpoint's own state names it, so a run resumed from it knows its best
            self.state.best_checkpoint = checkpoint_name(self.state.step)
        path = self.save_checkpoint()
        if best:
            self.checkpointer.mark_best(path.name)
        if notice or self._notice():
            raise preemption.Preempted(f"preemption notice: checkpointed after epoch {epoch} at step "
                                       f"{self.state.step}")
        if decision.stop is Stop.HEALTH:
            raise TrainingStopped(str(decision.reason))
        if decision.stop is Stop.EARLY:
            log.info("early stopping after epoch %d: %s", epoch, decision.reason)
        return decision.stop is not None

    def _evaluate_and_decide(self, epoch: int, stats: EpochStats) -> Decision:
        """Every rank scores; rank 0 computes, writes and decides; every rank gets rank 0's decision.

        A failure in rank 0's part (a coverage error, an unwritable file) travels in the same broadcast,
        so the other ranks end with the same one-line error at once instead of waiting in a collective.
        The LR schedule's plateau state rides along: reduce-on-plateau decides on rank 0's metric."""
        self.engine.sync_buffers()
        local = self._score()
        decision, failure = Decision(), None
        try:
            merged = scoring.gather_scores(self.env, local, self.val_counts.samples)
            if merged is not None:
                record = self._record(epoch, stats, merged)
                decision = self._decide(epoch, stats, record)
                self.lr_schedule.on_eval(record[self.cfg.eval.metric])
        except (DistTrainError, OSError) as error:
            failure = f"rank 0 failed in evaluation: {one_line(error)}"
        shared = (decision, failure, self.lr_schedule.state_dict())
        decision, failure, schedule = distributed.broadcast_object(self.env, shared)
        if failure:
            raise TrainingStopped(failure)
        self.lr_schedule.load_state_dict(schedule)
        return decision

    def _score(self) -> scoring.Scores:
        """This rank's share of the validation set, scored once, with the configured TTA."""
        stream = EvalStream(self.val_urls, self.decoders["eval"], self.cfg.eval.batch_size, self.env.rank,
                            self.env.world_size, self.cfg.data.workers, shard_samples=self.val_counts.per_shard)
        loader = map(self.device_decode, self.loader_factory(stream, self.cfg.data, False, self.cfg.engine.timeout_s))
        faults.point("scoring.score")
        return scoring.score_stream(self.engine.module, loader, self.env.device, self.cfg.eval.tta, self.loss_fn,
                                     self.engine.autocast, self.normalise)

    def _record(self, epoch: int, train_stats: EpochStats, merged: scoring.Scores) -> dict[str, Any]:
        """Rank 0: the official metrics and the epoch's figures; predictions, ROC plot and log written."""
        faults.point("scoring.record")
        record = self._metrics(merged)
        record.update(epoch=epoch, val_loss=merged.loss_sum / max(len(merged.keys), 1),
                      predicted_positives=sum(score > 0.5 for score in merged.scores),
                      train_loss=train_stats.loss_sum / max(train_stats.samples, 1),
                      train_recall=train_stats.true_positives / max(train_stats.positives, 1),
                      train_predicted_positives=train_stats.predicted_positives)
        scoring.write_predictions(self.run_dir / "predictions_val.csv", merged)
        roc_png = self.run_dir / "plots" / f"roc-epoch{epoch:03d}.png"
        roc_png.parent.mkdir(parents=True, exist_ok=True)
        metrics.plot_roc(merged.labels, merged.scores, roc_png)
        self.tracker.log_eval(self.state.step, record, roc_png)
        log.info("epoch %d: alpha %.4f beta %.4f auc %.4f val_loss %.4f", epoch, record["alpha"],
                 record["beta"], record["auc"], record["val_loss"])
        return record

    def _metrics(self, merged: scoring.Scores) -> dict[str, Any]:
        """The official metrics with eval.bootstrap's intervals. Rank 0 resamples while the other ranks wait in a
        collective that fails after engine.timeout_s (about 1 s per 100 resamples of 10,000 scores), so with
        other ranks the resampling stops at half of it, with a warning, rather than the run dying of it."""
        wanted = self.cfg.eval.bootstrap
        budget_s = self.cfg.engine.timeout_s / 2 if self.env.is_distributed else None
        record = metrics.compute_all(merged.labels, merged.scores, bootstrap=wanted, time_budget_s=budget_s)
        drawn = record.get("bootstrap_resamples")
        if isinstance(drawn, int) and 0 < drawn < wanted:  # 0: one class only, no interval at all
            message = (f"eval.bootstrap: {drawn} of {wanted} resamples in the {budget_s:.0f} s "
                       f"the other ranks can wait for rank 0 (half of engine.timeout_s), and the intervals use "
                       f"those: lower eval.bootstrap or raise engine.timeout_s")
            log.warning(message)
            self.tracker.log_event("warning", {"message": message, "epoch": self.state.epoch})
        return record

    def _decide(self, epoch: int, stats: EpochStats, record: dict[str, Any]) -> Decision:
        """Rank 0 only: the rules' verdict, the best predictions kept, a rising validation loss warned of."""
        decision = decide(self.state, self.cfg, epoch, stats.predicted_positives, record)
        if decision.improved:
            shutil.copyfile(self.run_dir / "predictions_val.csv", self.run_dir / "predictions_best.csv")
        self._warn_val_loss(record["val_loss"])
        return decision

    def _warn_val_loss(self, val_loss: float) -> None:
        self.state.val_loss_history.append(val_loss)
        rises = self.cfg.health.val_loss_rise_epochs
        after_unfreeze = len(self.state.phases_ran) > 1
        if after_unfreeze and val_loss_rising(self.state.val_loss_history, rises):
            message = f"validation loss rose for {rises} evaluations in a row after an unfreeze"
            log.warning(message)
            self.tracker.log_event("warning", {"message": message, "epoch": self.state.epoch})

    # ------------------------------------------------------------ preemption

    def _notice(self) -> bool:
        """Whether any rank has a preemption notice (one all-reduce; every rank gets the same answer)."""
        flag = torch.tensor([float(preemption.requested())])
        return bool(distributed.all_reduce_sum(self.env, flag)[0] > 0)

    def _preempt(self, message: str) -> None:
        log.warning(message)
        self.save_checkpoint()
        raise preemption.Preempted(f"checkpointed at step {self.state.step}")

    # ------------------------------------------------------------ phases, logging, bad data

    def enter_phase(self, epoch: int) -> None:
        """Train what the unfreeze phase of `epoch` trains (nothing happens when it is already running)."""
        phase = self.unfreeze.phase_index_at(epoch)
        if phase == self.state.phase:
            return
        info = self.engine.enter_phase(self.unfreeze, phase)
        self.lr_schedule.on_phase_start(phase, self._schedule_step(epoch))
        self.state.phase = phase
        info = {**info, "epoch": epoch, "step": self.state.step}
        self.state.phases_ran.append(info)
        log.info("unfreeze phase %d from epoch %d: trains %s, %d trainable parameters", phase, epoch,
                 info["train"], info["trainable_params"])
        self.tracker.log_event("phase", info)

    def _log_train(self, epoch: int, loss: float, images_per_s: float) -> None:
        lrs = [group["lr"] for group in self.engine.optimizer.param_groups]
        self.tracker.log_train(self.state.step, {
            "epoch": epoch + (self.state.step - self.state.epoch_start_step) / self.steps_per_epoch,
            "loss": loss, "lr": lrs, "images_per_s": images_per_s, "phase": self.state.phase,
            "accumulation": self.cfg.train.accumulation_steps})

    # ------------------------------------------------------------ checkpoints

    def parts(self) -> dict[str, Stateful]:
        """The run's resumable parts, stored once (rank 0's)."""
        return {"trainer": self.state, "lr_schedule": self.lr_schedule, "engine_extra": self.engine}

    def rank_parts(self) -> dict[str, Stateful]:
        """The resumable parts every rank has its own of."""
        return {"position": self.stream, "rng": self.rng}

    def save_checkpoint(self) -> Path:
        self.state.wall_time_s = self._wall_time()
        meta = {"config": scrub_secrets(to_dict(self.cfg)), "run_id": self.tracker.run_id,
                "steps_per_epoch": self.steps_per_epoch, "shard_preprocessing": self.shard_preprocessing,
                "workers": self.cfg.data.workers, "deal": self._deal()}
        path = self.checkpointer.save(self.state.step, self.engine, self.parts(), self.rank_parts(), meta)
        self.tracker.log_event("checkpoint", {"path": str(path), "epoch": self.state.epoch, "step": self.state.step})
        return path

    def _resume(self, folder: Path) -> dict[str, Any]:
        saved = read_trainer_state(folder)
        self.state.load_state_dict(saved["trainer"])
        if self.state.phase >= 0:
            self.engine.enter_phase(self.unfreeze, self.state.phase)
        same_layout = (saved["world_size"], saved["workers"], saved.get("deal", "by_shards")) == \
            (self.env.world_size, self.cfg.data.workers, self._deal())
        self.checkpointer.restore(folder, saved, self.engine, self.parts(), self.rank_parts() if same_layout else {})
        restore_settings(self.engine.optimizer, self.model, self.unfreeze, self.cfg.optim, self.batch_scale)
        if saved["steps_per_epoch"] != self.steps_per_epoch:
            self._rescale_progress(saved["steps_per_epoch"])
        if not same_layout:
            done = (self.state.step - self.state.epoch_start_step) * self.cfg.train.accumulation_steps
            self.stream.reset(micro_batches=done)
        self._resumed = {"from": str(folder), "step": self.state.step, "epoch": self.state.epoch,
                         "saved_world_size": saved["world_size"], "world_size": self.env.world_size,
                         "exact_position": same_layout, "config_changes": self.config_changes}
        return saved

    def _rescale_progress(self, saved_steps_per_epoch: int) -> None:
        """Another world size changed the epoch's length: the epoch keeps its fraction, the LR schedule its place."""
        ratio = self.steps_per_epoch / saved_steps_per_epoch
        done = self.state.rescale_epoch(ratio, self.steps_per_epoch)
        self.lr_schedule.rescale(ratio)
        log.info("epoch length %d -> %d optimizer steps: %d steps of epoch %d count as done", saved_steps_per_epoch,
                 self.steps_per_epoch, done, self.state.epoch)

    def _deal(self) -> str:
        """How shards were dealt to slots: saved positions mean something only under the same deal."""
        return "by_samples" if self.train_counts.per_shard is not None else "by_shards"

    def _announce(self, resume_from: Path | None, saved: dict[str, Any] | None) -> None:
        log.info("rank %d/%d on host %s (%s, %s)", self.env.rank, self.env.world_size, socket.gethostname(),
                 self.env.device, self.engine.kind)
        peaks = ", ".join(f"{lr:.3g}" for lr in phase_peak_lrs(self.cfg.unfreeze.phases, self.cfg.optim,
                                                               self.batch_scale))
        log.info("global batch %d, LR scale %.4g (optim.lr_scaling=%s): peak LR per phase %s", self.global_batch,
                 self.batch_scale, self.cfg.optim.lr_scaling, peaks)
        for warning in self.warnings:
            log.warning(warning)
            self.tracker.log_event("warning", {"message": warning, "step": self.state.step})
        if saved:
            log.info("resumed from %s at epoch %d, step %d; saved with world size %d, now %d", resume_from,
                     self.state.epoch, self.state.step, saved["world_size"], self.env.world_size)
            self.tracker.log_event("resume", self._resumed)

    def _wall_time(self) -> float:
        """Wall time across resumes: what earlier attempts spent plus this process's time."""
        return self.wall_base + time.monotonic() - self.started

    def summary(self) -> dict[str, Any]:
        ran = {phase["phase"] for phase in self.state.phases_ran}
        configured = list(range(len(self.cfg.unfreeze.phases)))
        return {"best_" + self.cfg.eval.metric: self.state.best_metric, "best_epoch": self.state.best_epoch,
                "epochs_to_first_positive": self.state.first_positive_epoch, "epochs_done": self.state.epoch,
                "steps": self.state.step, "wall_time_s": round(self._wall_time(), 2),
                "images_per_s": round(self.state.seen_samples / max(self._wall_time(), 1e-9), 2),
                "world_size": self.env.world_size, "engine": self.engine.kind,
                "phases_ran": self.state.phases_ran,
                "phases_not_run": [p for p in configured if p not in ran],
                "best_record": self.state.best_record, "best_checkpoint": self.state.best_checkpoint,
                "global_batch": self.global_batch, "lr_scale": self.batch_scale, "warnings": self.warnings,
                "run_dir": str(self.run_dir)}
