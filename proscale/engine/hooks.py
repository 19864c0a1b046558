"""After-step hooks of the training loop (proscale/engine/loop.py): logging, the non-finite
guard, stopping on a signal or at `stop_after`, periodic checkpoints, periodic evaluation, and
what happens at the end (final evaluation, model_final.pt). `default_hooks` lists them in the
order they run after each step: a step is logged before anything can stop the run.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path

import torch

from proscale import distributed as du
from proscale.engine.checkpointer import checkpoint_name, save_training_checkpoint
from proscale.engine.loop import HookBase, Trainer
from proscale.fileio import atomic_write, json_default

logger = logging.getLogger("proscale.train")


class NonFiniteLossError(FloatingPointError):
    """Raised after `max_nonfinite` consecutive steps with a non-finite loss or gradient, once
    a checkpoint is saved: `.iteration`, `.checkpoint` (its path), `.skipped` (steps skipped in
    the run). The skipped steps left the weights alone; --resume continues after their batches."""

    def __init__(self, message: str, iteration: int | None = None, checkpoint: Path | None = None,
                 skipped: int = 0):
        super().__init__(message)
        self.iteration, self.checkpoint, self.skipped = iteration, checkpoint, skipped


# ------------------------------------------------------------------------------ metrics
def iteration_of_record(line: str) -> float:
    """The iteration of a metrics.jsonl line; inf for a line that is not a record (e.g. cut short
    by a crash), so that it is dropped."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl and, with `tensorboard`, the same numbers to
    TensorBoard event files in OUT/tensorboard (train/<loss>, eval/<task>/<metric>; needs the
    optional `tensorboard` package). Rank 0 only; a no-op elsewhere."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool = False):
        self.path, self.enabled = path, enabled
        self.tensorboard = enabled and tensorboard
        self._tb = None
        self._purge_step: int | None = None

    def truncate_after(self, iteration: int) -> None:
        """Drops the lines written after `iteration`: they belong to a run's lost future
        (resuming from an older checkpoint). TensorBoard drops its events after it too."""
        self._purge_step = iteration + 1
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if iteration_of_record(line) <= iteration]
            atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=json_default) + "\n")
        if self.tensorboard:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict) -> None:
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("tensorboard is not installed (pip install tensorboard): metrics go to %s only",
                               self.path.name)
                self.tensorboard = False
                return
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._purge_step)
        step = int(record["iteration"])
        for key, value in record.items():
            if key == "eval":
                for task, metrics in value.items():
                    for name, v in (metrics or {}).items():
                        if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                            self._tb.add_scalar(f"eval/{task}/{name}", v, step)
            elif key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def finite_summary(results: dict) -> dict:
    """Evaluation results without per-class tables, NaN -> None (JSON)."""
    out = {}
    for task, res in results.items():
        if isinstance(res, dict):
            out[task] = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                         for k, v in res.items() if not isinstance(v, dict)}
        else:
            out[task] = res
    return out


class MetricsWriter(HookBase):
    """Every `log_period` iterations (and at the last one, and when the run gives up on non-finite
    steps): one metrics.jsonl line with the losses averaged over the window and over ranks, lr,
    seconds per iteration, gradient norm and ETA; a tqdm bar on a terminal, else a log line.
    The ETA uses an exponential moving average of the step time, so a burst of load moves it
    only a little."""

    def __init__(self, log: MetricsLog, progress: bool, max_nonfinite: int):
        self.log, self.progress, self.max_nonfinite = log, progress, max_nonfinite
        self.window: list[torch.Tensor] = []  # loss vectors of the steps taken since the last line
        self.bad_window: list[torch.Tensor] = []  # ... of the steps skipped since then
        self.seconds: list[float] = []
        self.bad_samples = 0
        self.sec_ema: float | None = None
        self.bar = None
        self.last_record: dict = {}

    def before_train(self, trainer: Trainer) -> None:
        if self.progress and trainer.info.is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.iterations, initial=trainer.iteration, desc="train", unit="it",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.last
        (self.bad_window if step.skipped else self.window).append(step.losses)
        self.seconds.append(step.seconds)
        self.bad_samples += step.bad_samples
        self.sec_ema = step.seconds if self.sec_ema is None else 0.9 * self.sec_ema + 0.1 * step.seconds
        it, cfg = trainer.iteration, trainer.cfg
        giving_up = trainer.nonfinite_in_a_row >= self.max_nonfinite
        if it % cfg.log_period == 0 or it == cfg.iterations or giving_up:
            self.last_record = self.write(trainer)
        if self.bar is not None:
            self.bar.update(1)

    def write(self, trainer: Trainer) -> dict:
        """One metrics.jsonl line for the window (losses of the steps taken; of the skipped ones
        when all were skipped); every rank must call it (losses are averaged over ranks)."""
        window = self.window or self.bad_window
        mean = torch.stack(window).mean(0).cpu()  # one device sync per log period
        values = {k: float(v) for k, v in zip(trainer.loss_keys + ["loss"], mean.tolist())}
        values["skipped"] = float(self.bad_samples)
        values = du.reduce_dict(values)
        bad_samples = round(values.pop("skipped") * du.get_world_size())
        groups = trainer.optimizer.param_groups
        lr = next((g["lr"] for g in groups if not g.get("name", "").startswith("backbone")), groups[0]["lr"])
        sec = sum(self.seconds) / max(len(self.seconds), 1)
        eta = (self.sec_ema or sec) * (trainer.cfg.iterations - trainer.iteration)
        record = {"iteration": trainer.iteration, "loss": values.pop("loss"), **values, "lr": lr, "time": sec,
                  "grad_norm": trainer.last.grad_norm, "eta_s": eta}
        if bad_samples:
            record["skipped"] = bad_samples
        if self.bad_window:
            record["nonfinite_steps"] = len(self.bad_window)
        if trainer.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20
        self.log.write(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
        elif trainer.info.is_main:  # no progress bar (not a terminal): a log line with the ETA instead
            e = int(eta)
            logger.info("iteration %d/%d  loss %.4f  lr %.3g  %.3f s/it  ETA %dh%02dm%02ds", trainer.iteration,
                        trainer.cfg.iterations, record["loss"], lr, sec, e // 3600, e // 60 % 60, e % 60)
        self.window, self.bad_window, self.seconds, self.bad_samples = [], [], [], 0
        return record

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class NonFiniteGuard(HookBase):
    """Warns about each skipped (non-finite) step; after `max_nonfinite` in a row it saves a
    checkpoint and raises NonFiniteLossError."""

    def __init__(self, max_nonfinite: int):
        self.max_nonfinite = max_nonfinite

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.last
        if not step.skipped:
            return
        n, it = trainer.nonfinite_in_a_row, trainer.iteration
        loss_finite = math.isfinite(float(step.losses[-1]))
        # Under fp16 an inf gradient is mostly the GradScaler probing its scale: quiet unless the
        # (fp32) loss itself is not finite.
        if not trainer.scaler.is_enabled() or not loss_finite:
            what = ("loss" if not loss_finite else f"gradient (norm {step.grad_norm})"
                    if not math.isfinite(step.grad_norm) else "loss on another process")
            logger.warning("iteration %d: non-finite %s, step skipped (%d in a row, %d in this run; the run stops "
                           "at %d in a row): %s", it, what, n, trainer.nonfinite_steps, self.max_nonfinite,
                           dict(zip(trainer.loss_keys + ["loss"], step.losses.tolist())))
        if n >= self.max_nonfinite:
            path = save_training_checkpoint(trainer)
            if trainer.info.is_main:
                logger.error("%d consecutive steps with a non-finite loss or gradient (max_nonfinite=%d): stopped "
                             "at iteration %d with checkpoint %s", n, self.max_nonfinite, it, path)
            raise NonFiniteLossError(f"{n} consecutive steps with a non-finite loss or gradient; stopped at "
                                     f"iteration {it}, checkpoint {path}", iteration=it, checkpoint=path,
                                     skipped=trainer.nonfinite_steps)


# ------------------------------------------------------------------------------ stopping
class StopOnSignal(HookBase):
    """SIGINT / SIGTERM set a flag; after the current iteration a checkpoint is saved and the run
    ends with status "interrupted" (a second SIGINT interrupts at once). `stop_after` > 0 ends it
    the same way at that iteration with status "stopped" (a time-sliced job)."""

    def __init__(self, stop_after: int = 0):
        self.stop_after = stop_after
        self.signal: int | None = None
        self._previous: dict = {}

    def before_train(self, trainer: Trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("received %s: stopping after this iteration (with a checkpoint)", signal.Signals(signum).name)

    def after_step(self, trainer: Trainer) -> None:
        # Every rank takes part in the reduction, every iteration: one rank's signal stops all.
        flag = torch.tensor([float(self.signal is not None)])
        stop_now = du.all_reduce_tensor(flag, "max").item() > 0
        if trainer.iteration == trainer.cfg.iterations:
            return
        if stop_now or trainer.iteration == self.stop_after:
            save_training_checkpoint(trainer)
            trainer.status = "interrupted" if stop_now else "stopped"

    def after_train(self, trainer: Trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ------------------------------------------------------------------------------ periodic work
class PeriodicCheckpointer(HookBase):
    """A training checkpoint every `period` iterations (not at the last one: model_final.pt is
    written then by FinalCheckpoint)."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self, trainer: Trainer) -> None:
        it = trainer.iteration
        if self.period > 0 and it % self.period == 0 and it < trainer.cfg.iterations:
            save_training_checkpoint(trainer)


class PeriodicEvaluator(HookBase):
    """Evaluates on the validation loader every `period` iterations and once at the end of a
    completed run; results go to metrics.jsonl and the log, the last ones to `self.results`."""

    def __init__(self, val_loader, metadata, tasks, log: MetricsLog, period: int):
        self.val_loader, self.metadata, self.tasks, self.log, self.period = val_loader, metadata, tasks, log, period
        self.results: dict = {}

    def evaluate(self, trainer: Trainer) -> dict:
        from proscale.engine.evaluate import evaluate

        self.results = evaluate(trainer.model, self.val_loader, self.metadata, self.tasks, trainer.cfg.test,
                                device=trainer.device, amp_dtype=trainer.amp_dtype)
        trainer.model.train()
        summary = finite_summary(self.results)
        self.log.write({"iteration": trainer.iteration, "eval": summary})
        if trainer.info.is_main:
            logger.info("iteration %d: %s", trainer.iteration, json.dumps(summary))
        return self.results

    def after_step(self, trainer: Trainer) -> None:
        it = trainer.iteration
        if self.period > 0 and it % self.period == 0 and it < trainer.cfg.iterations:
            self.evaluate(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.status == "completed":
            self.evaluate(trainer)


class FinalCheckpoint(HookBase):
    """model_final.pt when the run completes (after the final evaluation: hooks run in order)."""

    def __init__(self):
        self.path: Path | None = None

    def after_train(self, trainer: Trainer) -> None:
        if trainer.status == "completed":
            self.path = save_training_checkpoint(trainer, "model_final.pt")
        elif trainer.status in ("stopped", "interrupted"):
            self.path = trainer.out / checkpoint_name(trainer.iteration)
            if trainer.info.is_main:
                logger.info("stopped at iteration %d; continue with --resume (checkpoint %s)", trainer.iteration,
                            self.path)
