"""Training: `train(TrainConfig) -> dict` and the `proscale train` command.

One GPU or CPU:
    proscale train --preset proscale_r50_333 --data coco-panoptic:/data/coco \\
        --val-data coco-panoptic:/data/coco --out runs/r50 [key=value ...]
Several GPUs (one process each, NCCL), one or more machines: the same command under torchrun
    torchrun --nproc_per_node 8 -m proscale train --preset ... --out runs/r50
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m proscale train ...
CPU processes (gloo): python -m torch.distributed.run --nproc_per_node 2 -m proscale train ... device=cpu
Resume after a stop, a crash or a preemption: the same command with --resume. It continues from
the newest checkpoint in --out that loads, warning about each one it passes over (truncated,
corrupt, missing); with no checkpoint at all it starts from scratch; with checkpoints none of
which loads, or that do not fit the model, it stops with an error (exit status 4) rather than
start over on top of them. Exit status: 0 done or interrupted (SIGINT / SIGTERM, checkpoint
saved), 2 bad data, 3 too many non-finite steps (checkpoint saved), 4 nothing to resume from.

`key=value` overrides: keys of TrainConfig (iterations=, batch_size=, solver.lr=, data.image_size=,
loss.num_points=, test.overlap_threshold= ...) or of the preset's ModelConfig
(encoder.plan=3,3,3, backbone.freeze_bn=true, decoder.num_queries=50, or model.<key>=).

What one iteration (optimizer step) does
- `batch_size` is the *global* batch: each of the W processes runs `solver.accumulate` micro-batches
  of batch_size / (W * accumulate) images. Micro-batch k of rank r is global micro-batch
  g = k * W + r: torch's RNG (point sampling, drop path) is seeded from (seed, iteration, g), and the
  data order from (seed, epoch), so the result does not depend on how the global batch is split:
  W processes give the weights one process gets with accumulate=W (test_ddp checks this).
- Mask losses are normalised by the number of target masks in the whole global batch (as
  Mask2Former does across GPUs), also across accumulation steps; the class loss is averaged.
- AMP (CUDA only): autocast fp16 (with a GradScaler) or bf16, the pixel decoder in fp32.
- Full-model gradient clipping at solver.clip_grad; a step whose loss (on any process) or gradient
  is not finite is skipped with a warning: no update, BatchNorm statistics restored, the iteration
  still counted; metrics.jsonl counts them ("nonfinite_steps"); `max_nonfinite` such steps in a row
  save a checkpoint and stop the run (NonFiniteLossError).
- SIGINT / SIGTERM: the current iteration finishes, a checkpoint is saved, the run ends cleanly
  (a second SIGINT interrupts at once; a checkpoint being written is then left out, not torn).
- Checkpoints are written to a temp file, fsynced and renamed, then last_checkpoint is moved to
  them: a crash (even SIGKILL or power loss) loses at most the iterations since the last one.
Outputs (rank 0 only) in `output_dir`: metrics.jsonl (one JSON object per logged iteration and
per evaluation), model_XXXXXXX.pt checkpoints (the last `keep_last` kept), model_final.pt,
last_checkpoint, config.yaml.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from proscale.config import ModelConfig, TrainConfig, apply_overrides, from_dict, to_dict
from proscale import distributed as du
from proscale.checkpoints.io import CheckpointError, UnsafeCheckpointError, load_checkpoint, safe_load, save_model
from proscale.engine.checkpointer import (check_training_checkpoint, checkpoint_name, prune, remove_stale_temps,
                                          resume_candidates, rng_state, set_rng_state, write_last)
from proscale.fileio import atomic_write
from proscale.engine.optim import build_lr_scheduler, build_optimizer, clip_and_norm

logger = logging.getLogger("proscale.train")

class NonFiniteLossError(FloatingPointError):
    """Raised after `max_nonfinite` consecutive steps with a non-finite loss or gradient, once
    a checkpoint is saved: `.iteration`, `.checkpoint` (its path), `.skipped` (steps skipped in
    the run). The skipped steps left the weights alone; --resume continues after their batches."""

    def __init__(self, message: str, iteration: int | None = None, checkpoint: Path | None = None,
                 skipped: int = 0):
        super().__init__(message)
        self.iteration, self.checkpoint, self.skipped = iteration, checkpoint, skipped


# ---------------------------------------------------------------------------------- building
def build_model_config(cfg: TrainConfig, num_classes: int) -> ModelConfig:
    from proscale.presets import get_preset

    mcfg = get_preset(cfg.preset)
    mcfg.num_classes = num_classes
    apply_overrides(mcfg, list(cfg.model_overrides))
    if mcfg.num_classes != num_classes:
        raise ValueError(f"num_classes={mcfg.num_classes} was overridden, but the data has {num_classes} classes")
    return mcfg


def build_train_dataset(cfg: TrainConfig):
    """The (concatenated) training data set and its metadata. A sample that fails to load stops
    the run with its DataError, or is replaced (data.skip_bad_samples=true; see SkipBadSamples)."""
    from torch.utils.data import ConcatDataset

    from proscale.data import SkipBadSamples, build_dataset, build_transforms

    if not cfg.data.train:
        raise ValueError("no training data: pass --data SPEC (data.train=...)")
    transforms = build_transforms(True, cfg.data)
    sets = [SkipBadSamples(build_dataset(spec, cfg.data.train_split, transforms, defer_errors=True),
                           skip=cfg.data.skip_bad_samples) for spec in cfg.data.train]
    metadata = sets[0].metadata
    for spec, ds in zip(cfg.data.train[1:], sets[1:]):
        if [c.id for c in ds.metadata.categories] != [c.id for c in metadata.categories]:
            raise ValueError(f"{spec}: its categories differ from those of {cfg.data.train[0]}")
    dataset = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    return dataset, metadata


def build_val_dataset(cfg: TrainConfig):
    from proscale.data import build_dataset, build_transforms

    if not cfg.data.val:
        return None
    return build_dataset(cfg.data.val, cfg.data.val_split, build_transforms(False, cfg.data))


def metadata_dict(metadata) -> dict:
    """Categories as plain data (stored in checkpoints; a Predictor rebuilds names and colours)."""
    return {"name": metadata.name,
            "categories": [{"id": c.id, "name": c.name, "isthing": bool(c.isthing), "color": list(c.color)}
                           for c in metadata.categories]}


def keep_fp32(module: nn.Module) -> nn.Module:
    """Runs `module` with autocast disabled and float32 inputs (PRO-SCALE.md: the pixel decoder,
    whose deformable attention and sampling offsets are sensitive, stays fp32 under AMP)."""
    forward = module.forward

    def fp32_forward(features):
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return forward({k: v.float() for k, v in features.items()})

    module.forward = fp32_forward
    return module


def step_seed(seed: int, iteration: int, micro_batch: int) -> int:
    """A 63-bit seed from (seed, iteration, global micro-batch), mixed as the data loader mixes
    its sample seeds (splitmix64)."""
    from proscale.data.collate import _mix

    return _mix(seed, iteration, micro_batch)


class BatchStream:
    """Endless batches of a `build_dataloader` loader, epoch after epoch, starting after
    `consumed` batches (of this rank); the position is a function of (seed, epoch) only."""

    def __init__(self, loader, consumed: int = 0):
        from proscale.data import set_epoch

        self.loader, self._set_epoch = loader, set_epoch
        set_epoch(loader, 0, 0)
        self.per_epoch = len(loader)
        if self.per_epoch == 0:
            raise ValueError("the training loader yields no batch")
        self.epoch, start = divmod(consumed, self.per_epoch)
        self._set_epoch(loader, self.epoch, start)
        self._it = iter(loader)

    def __next__(self) -> dict:
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._set_epoch(self.loader, self.epoch, 0)
            self._it = iter(self.loader)
            batch = next(self._it)
        return batch


def _to_device(batch: dict, device: torch.device) -> tuple[list, list]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in batch["images"]]
    targets = [{"labels": t["labels"].to(device, non_blocking=nb), "masks": t["masks"].to(device, non_blocking=nb)}
               for t in batch["targets"]]
    return images, targets


class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checks it after each iteration. A second SIGINT
    interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("received %s: stopping after this iteration (with a checkpoint)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool, resume_from: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_from is not None and path.is_file():
            # Lines written after the checkpoint we resume from belong to a lost future.
            kept = [line for line in path.read_text().splitlines() if _iteration_of(line) <= resume_from]
            atomic_write(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")


def _iteration_of(line: str) -> float:
    """The iteration of a metrics.jsonl line; inf for a line that is not a record (e.g. cut short
    by a crash), so that it is dropped."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first sentence or so (torch's load errors run to a paragraph of advice)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if len(text) > limit:
        cut = text.find(". ", 60)
        text = text[:cut + 1] if 0 < cut < limit else text[:limit] + " ..."
    return text


def _json_default(x):
    return x.tolist() if isinstance(x, torch.Tensor) else str(x)


def _finite_summary(results: dict) -> dict:
    """Evaluation results without per-class tables, NaN -> None (JSON)."""
    out = {}
    for task, res in results.items():
        if isinstance(res, dict):
            out[task] = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None)
                         for k, v in res.items() if not isinstance(v, dict)}
        else:
            out[task] = res
    return out


# ---------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Trains as `cfg` says; returns {"status", "iteration", "output_dir", "checkpoint", "losses",
    "eval", "nonfinite_steps"}. Under torchrun every process calls it. `resume`: continue from the
    newest checkpoint in cfg.output_dir that loads (a fresh start when there is none; CheckpointError
    when there are some but none can be resumed from: see Trainer.resume)."""
    info = du.init_distributed(cfg.device)
    handlers = []
    log_state = (logger.level, logger.propagate)
    try:
        if info.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            handlers = _attach_log_handlers(Path(cfg.output_dir) / "log.txt")
        return _train(cfg, info, resume)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(log_state[0])
        logger.propagate = log_state[1]
        du.cleanup(info)


def _train(cfg: TrainConfig, info: du.DistInfo, resume: bool) -> dict:
    trainer = Trainer(cfg, info)
    if resume:
        trainer.resume()
    return trainer.run()


class Trainer:
    """One training run on this process: model, criterion, optimizer, data, and the loop."""

    def __init__(self, cfg: TrainConfig, info: du.DistInfo):
        from proscale.data import build_dataloader
        from proscale.engine.evaluate import tasks_from_config
        from proscale.models.criterion import build_criterion
        from proscale.models.maskformer import build_maskformer

        self.cfg, self.info, self.device = cfg, info, info.device
        self.out = Path(cfg.output_dir)
        W, A = info.world_size, cfg.solver.accumulate
        if A < 1 or cfg.batch_size % (W * A):
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of processes x accumulate = {W} x {A}")
        self.micro = cfg.batch_size // (W * A)  # images per forward on this process

        dataset, self.metadata = build_train_dataset(cfg)
        val_dataset = build_val_dataset(cfg)
        # Evaluation scores against the val split's own ground truth (paths live in its metadata).
        self.val_metadata = val_dataset.metadata if val_dataset is not None else None
        mcfg = build_model_config(cfg, self.metadata.num_classes)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = build_maskformer(mcfg).to(self.device)
        self.use_amp = cfg.solver.amp and self.device.type == "cuda"
        self.amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.solver.amp_dtype]
        if self.use_amp:
            keep_fp32(self.model.pixel_decoder)
        self.criterion = build_criterion(mcfg.num_classes, cfg.loss).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver, cfg.iterations)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.loader = build_dataloader(dataset, self.micro, train=True, num_workers=cfg.data.num_workers,
                                       seed=cfg.seed, distributed=info.distributed)
        self.val_loader = None
        if val_dataset is not None:
            self.val_loader = build_dataloader(val_dataset, 1, train=False, num_workers=cfg.data.num_workers,
                                               distributed=info.distributed)
        self.eval_tasks = tasks_from_config(cfg.test)
        self.iteration, self.consumed = 0, 0
        self.resumed_from: Path | None = None
        self.loss_keys: list[str] = []
        self.step_skipped = False
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, this run
        # BatchNorm statistics change in every forward: a skipped step puts them back.
        self._running_stats = [b for m in self.model.modules()
                               if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    # ------------------------------------------------------------------ checkpoints
    def resume(self) -> None:
        """Continues from the newest good checkpoint in the output folder (a fresh start when
        there is none).

        Rank 0 walks `checkpointer.resume_candidates` (last_checkpoint, or a complete newer file
        a crash left it behind, then the older ones) past every file that is missing, truncated
        or otherwise unreadable, or not a training checkpoint, logging a warning that names the
        file and the problem; the other ranks load the file it chose. It refuses (CheckpointError),
        as detectron2 and Lightning do for a checkpoint they cannot load, rather than starting
        over when
          - checkpoint files exist but none of them can be read: starting afresh would overwrite
            and prune them (move them away, or use another output folder, to start over);
          - a checkpoint asks to run code (UnsafeCheckpointError): nothing of it ran;
          - a readable checkpoint does not fit the model or optimizer (another preset or
            overrides than the run had): an older one would not fit either.
        With no checkpoint at all it starts from scratch with a log line (detectron2's
        resume_or_load, Lightning's ckpt_path="last", Megatron and torchtitan do the same).
        """
        chosen, ckpt, error = None, None, None
        if self.info.is_main:
            for p in remove_stale_temps(self.out):
                logger.info("removed %s, the temp file of a checkpoint write that was interrupted", p)
            try:
                chosen, ckpt = self._find_resumable()
            except CheckpointError as e:
                error = e
        decision = du.broadcast_object({"name": chosen.name if chosen else None,
                                        "error": str(error) if error else None})
        if error is not None:
            raise error
        if decision["error"]:
            raise CheckpointError(decision["error"])
        if decision["name"] is None:
            return
        if not self.info.is_main:
            chosen = self.out / decision["name"]
            ckpt = safe_load(chosen)
            check_training_checkpoint(ckpt, chosen)
            self._load_training_state(ckpt, chosen)
        self.resumed_from = chosen
        if self.info.is_main:
            logger.info("resumed from %s at iteration %d", chosen, self.iteration)

    def _find_resumable(self) -> tuple[Path | None, dict | None]:
        """(path, loaded checkpoint) of the first good resume candidate, its state loaded into
        the trainer; (None, None) when the folder holds no checkpoint. See `resume`."""
        candidates, notes = resume_candidates(self.out)
        for note in notes:
            logger.warning("--resume: %s; looking for the newest checkpoint kept instead", note)
        if not candidates:
            logger.info("--resume: no checkpoint in %s, starting from scratch", self.out)
            return None, None
        problems = []
        for path in candidates:
            try:
                ckpt = safe_load(path)
                check_training_checkpoint(ckpt, path)
            except UnsafeCheckpointError:
                raise
            except (CheckpointError, OSError) as e:  # corrupt, truncated, gone since listed, unreadable
                problem = _first_line(e)
                if problem.startswith(f"{path}: "):
                    problem = problem[len(f"{path}: "):]
                problems.append(f"{path}: {problem}")
                later = "trying the next newest one" if path != candidates[-1] else "no older checkpoint left"
                logger.warning("--resume: cannot continue from %s: %s; %s", path, problem, later)
                continue
            self._load_training_state(ckpt, path)
            if problems:
                logger.warning("--resume: fell back to %s (iteration %d) past %d unusable checkpoint(s)", path,
                               self.iteration, len(problems))
            return path, ckpt
        raise CheckpointError(
            f"--resume: none of the {len(candidates)} checkpoints in {self.out} can be resumed from:\n"
            + "\n".join(f"  {p}" for p in problems)
            + f"\nRefusing to start from scratch over them: move them away or choose another output folder "
              f"to start over (or fix last_checkpoint to name a good file).")

    def _load_training_state(self, ckpt: dict, path: Path) -> None:
        """Model, optimizer, schedule, scaler, RNG and data position from a checked checkpoint.
        A checkpoint that does not fit raises CheckpointError naming it."""
        try:
            load_checkpoint(self.model, ckpt, strict=True, source="proscale")
            # Optimizer state (moments, step counts) from the checkpoint; hyper-parameters and the
            # schedule from the current config, so a resumed run may change them (e.g. more iterations).
            hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (CheckpointError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} does not fit this run's model / optimizer (another preset or model "
                                  f"overrides?): {e}") from None
        for group, h in zip(self.optimizer.param_groups, hparams):
            group.update(h)
        sched = {k: v for k, v in ckpt["scheduler"].items() if k not in ("base_lrs", "_last_lr")}
        self.scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        self.iteration = int(ckpt["iteration"])
        W, A = self.info.world_size, self.cfg.solver.accumulate
        data = ckpt.get("data") or {}
        if (data.get("micro_batch"), data.get("world_size"), data.get("accumulate")) == (self.micro, W, A):
            self.consumed = int(data["batches_per_rank"])
        else:
            # Another batch layout: continue after as many images as were seen, as near as batches allow.
            self.consumed = self.iteration * A
            if self.info.is_main:
                logger.warning("%s was written with another batch layout: the data order continues "
                               "approximately, not exactly", path)

    def save(self, name: str | None = None) -> Path:
        """Writes a training checkpoint (rank 0; every rank must call it: RNG states are gathered)."""
        rngs = du.all_gather_object(rng_state())
        path = self.out / (name or checkpoint_name(self.iteration))
        if self.info.is_main:
            W, A = self.info.world_size, self.cfg.solver.accumulate
            extra = {"iteration": self.iteration, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                     "data": {"batches_per_rank": self.iteration * A, "micro_batch": self.micro, "world_size": W,
                              "accumulate": A},
                     "metadata": metadata_dict(self.metadata), "train_config": _plain(to_dict(self.cfg))}
            save_model(self.model, path, extra=extra)
            write_last(self.out, path.name)
            prune(self.out, self.cfg.keep_last)
        du.barrier()
        return path

    # ------------------------------------------------------------------ one step
    def step(self, ddp_model: nn.Module, batches: list[dict]) -> tuple[torch.Tensor, float]:
        """One optimizer step over this process's micro-batches; returns (loss vector: the
        unweighted losses averaged over micro-batches, then the weighted total; gradient norm).

        When the total loss (on any rank) or the gradient norm is not finite the step is skipped:
        no optimizer update, and BatchNorm running statistics are put back as they were, so the
        model is exactly as before; the iteration still counts (its data and its place in the lr
        schedule are used up). `self.step_skipped` says which happened."""
        W, A, rank = self.info.world_size, len(batches), self.info.rank
        mask_scale, ce_scale = _loss_scales(batches, W, self.device)
        saved_stats = [b.clone() for b in self._running_stats]
        loss_vec = None
        for k, batch in enumerate(batches):
            torch.manual_seed(step_seed(self.cfg.seed, self.iteration, k * W + rank))
            images, targets = _to_device(batch, self.device)
            sync = ddp_model.no_sync() if (self.info.distributed and k < A - 1) else contextlib.nullcontext()
            with sync:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    outputs = ddp_model(images)
                losses = self.criterion(outputs, targets)
                if not self.loss_keys:
                    self.loss_keys = list(losses)
                total = sum(self.criterion.weight(n) * v * (ce_scale if n.startswith("loss_ce") else mask_scale[k])
                            for n, v in losses.items())
                self.scaler.scale(total).backward()
            vec = torch.stack([losses[n].detach() for n in self.loss_keys] + [total.detach()])
            loss_vec = vec if loss_vec is None else loss_vec + vec
        loss_vec[:-1] /= A

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_and_norm(self.params, self.cfg.solver.clip_grad)
        # The norm is of the all-reduced gradients, the same on every rank; the loss is not
        # (a loss can be inf / nan with finite gradients): its verdict is reduced over ranks.
        loss_bad = (~torch.isfinite(loss_vec[-1])).float()
        if self.info.distributed:
            loss_bad = du.all_reduce_tensor(loss_bad, "max")
        loss_ok = loss_bad.item() == 0.0
        grad_ok = math.isfinite(grad_norm)
        if loss_ok and (grad_ok or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # optimizer.step(); with fp16 it skips inf gradients itself
        self.step_skipped = not (loss_ok and grad_ok)
        if self.step_skipped:
            with torch.no_grad():
                for buf, old in zip(self._running_stats, saved_stats):
                    buf.copy_(old)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        return loss_vec, grad_norm

    def evaluate(self, log: "MetricsLog") -> dict:
        from proscale.engine.evaluate import evaluate

        results = evaluate(self.model, self.val_loader, self.val_metadata, self.eval_tasks, self.cfg.test,
                           device=self.device, amp_dtype=self.amp_dtype if self.use_amp else None)
        self.model.train()
        log.write({"iteration": self.iteration, "eval": _finite_summary(results)})
        if self.info.is_main:
            logger.info("iteration %d: %s", self.iteration, json.dumps(_finite_summary(results)))
        return results

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            _write_config(self.out / "config.yaml", cfg)
        log = MetricsLog(self.out / "metrics.jsonl", info.is_main,
                         resume_from=self.iteration if self.resumed_from else None)
        ddp_model = du.wrap_model(self.model, info, cfg.find_unused_parameters)
        stream = BatchStream(self.loader, self.consumed)
        bar = _progress(cfg, info, self.iteration)
        window: list[torch.Tensor] = []  # loss vectors since the last log line
        bad_window: list[torch.Tensor] = []  # ... of the steps skipped since then
        times: list[float] = []
        nonfinite = 0
        skipped = 0  # bad samples replaced since the last log line (this rank)
        last_losses: dict = {}
        eval_results: dict = {}
        status = "completed"
        self.model.train()
        with _StopFlag() as stop:
            t_last = time.perf_counter()
            while self.iteration < cfg.iterations:
                batches = [next(stream) for _ in range(cfg.solver.accumulate)]
                skipped += sum(len(events) for b in batches for events in b.get("skipped", ()))
                loss_vec, grad_norm = self.step(ddp_model, batches)
                now = time.perf_counter()
                times.append(now - t_last)
                t_last = now
                it = self.iteration
                if not self.step_skipped:
                    nonfinite = 0
                    window.append(loss_vec)
                else:
                    nonfinite += 1
                    self.nonfinite_steps += 1
                    bad_window.append(loss_vec)
                    loss_finite = math.isfinite(float(loss_vec[-1]))
                    # Under fp16 an inf gradient is mostly the GradScaler probing its scale: quiet
                    # unless the (fp32) loss itself is not finite.
                    if not self.scaler.is_enabled() or not loss_finite:
                        what = ("loss" if not loss_finite else f"gradient (norm {grad_norm})" if not
                                math.isfinite(grad_norm) else "loss on another process")
                        logger.warning("iteration %d: non-finite %s, step skipped (%d in a row, %d in this run; the "
                                       "run stops at %d in a row): %s", it, what, nonfinite, self.nonfinite_steps,
                                       cfg.max_nonfinite, dict(zip(self.loss_keys + ["loss"], loss_vec.tolist())))
                give_up = nonfinite >= cfg.max_nonfinite
                if it % cfg.log_period == 0 or it == cfg.iterations or give_up:
                    # Losses of the steps taken; of the skipped ones when all were skipped.
                    last_losses = _log_window(log, bar, self.loss_keys, window or bad_window, times, skipped, it,
                                              self.optimizer, grad_norm, cfg, self.device, nonfinite=len(bad_window))
                    window, bad_window, times, skipped = [], [], [], 0
                if give_up:
                    path = self.save()
                    if info.is_main:
                        logger.error("%d consecutive steps with a non-finite loss or gradient (max_nonfinite=%d): "
                                     "stopped at iteration %d with checkpoint %s", nonfinite, cfg.max_nonfinite, it,
                                     path)
                    raise NonFiniteLossError(f"{nonfinite} consecutive steps with a non-finite loss or gradient; "
                                             f"stopped at iteration {it}, checkpoint {path}", iteration=it,
                                             checkpoint=path, skipped=self.nonfinite_steps)
                if bar is not None:
                    bar.update(1)
                stop_now = du.all_reduce_tensor(torch.tensor([float(stop.signal is not None)]), "max").item() > 0
                if it == cfg.iterations:
                    break
                if stop_now or it == cfg.stop_after:
                    self.save()
                    status = "interrupted" if stop_now else "stopped"
                    break
                if cfg.checkpoint_period > 0 and it % cfg.checkpoint_period == 0:
                    self.save()
                if self.val_loader is not None and cfg.eval_period > 0 and it % cfg.eval_period == 0:
                    eval_results = self.evaluate(log)
                    t_last = time.perf_counter()
        if bar is not None:
            bar.close()
        if status == "completed":
            if self.val_loader is not None:
                eval_results = self.evaluate(log)
            path = self.save("model_final.pt")
        else:
            path = self.out / checkpoint_name(self.iteration)
            if info.is_main:
                logger.info("stopped at iteration %d; continue with --resume (checkpoint %s)", self.iteration, path)
        return {"status": status, "iteration": self.iteration, "output_dir": str(self.out), "checkpoint": str(path),
                "losses": last_losses, "eval": eval_results, "nonfinite_steps": self.nonfinite_steps}


def _loss_scales(batch_list: list[dict], world: int, device: torch.device) -> tuple[list[float], float]:
    """Per micro-batch factors that make the step's mask losses a mean over the masks of the
    whole global batch (the criterion divides by each micro-batch's count, averaged over ranks),
    and the class loss a mean over micro-batches."""
    A = len(batch_list)
    if A == 1:
        return [1.0], 1.0
    counts = torch.tensor([float(sum(len(t["labels"]) for t in b["targets"])) for b in batch_list])
    counts = du.all_reduce_tensor(counts.to(device), "sum").cpu()
    total = max(float(counts.sum()) / world, 1.0)
    return [max(float(c) / world, 1.0) / total for c in counts], 1.0 / A


def _log_window(log: MetricsLog, bar, keys, window, times, skipped, iteration, optimizer, grad_norm, cfg,
                device, nonfinite: int = 0) -> dict:
    """Writes one metrics.jsonl line: losses averaged over the window (and over ranks), lr, seconds
    per iteration, gradient norm, ETA; "skipped" (bad samples replaced, all ranks) and
    "nonfinite_steps" (steps skipped for a non-finite loss or gradient) when any."""
    mean = torch.stack(window).mean(0).cpu()  # one device sync per log period
    values = {k: float(v) for k, v in zip(keys + ["loss"], mean.tolist())}
    values["skipped"] = float(skipped)
    values = du.reduce_dict(values)
    skipped_all = round(values.pop("skipped") * du.get_world_size())
    lr = next((g["lr"] for g in optimizer.param_groups if not g.get("name", "").startswith("backbone")),
              optimizer.param_groups[0]["lr"])
    sec = sum(times) / max(len(times), 1)
    record = {"iteration": iteration, "loss": values.pop("loss"), **values, "lr": lr, "time": sec,
              "grad_norm": grad_norm, "eta_s": sec * (cfg.iterations - iteration)}
    if skipped_all:
        record["skipped"] = skipped_all
    if nonfinite:
        record["nonfinite_steps"] = nonfinite
    if device.type == "cuda":
        record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    log.write(record)
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
    elif du.is_main_process():  # no progress bar (not a terminal): a log line with the ETA instead
        eta = int(record["eta_s"])
        logger.info("iteration %d/%d  loss %.4f  lr %.3g  %.3f s/it  ETA %dh%02dm%02ds", iteration, cfg.iterations,
                    record["loss"], lr, sec, eta // 3600, eta // 60 % 60, eta % 60)
    return record


def _progress(cfg: TrainConfig, info: du.DistInfo, start: int):
    """A tqdm bar (rank 0, stderr a terminal); None otherwise (log lines carry the ETA)."""
    if not (cfg.progress and info.is_main and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.iterations, initial=start, desc="train", unit="it", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def _attach_log_handlers(path: Path) -> list[logging.Handler]:
    """Rank 0 logs INFO to stderr and OUT/log.txt for the duration of a run."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(path)]
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return handlers


def _plain(value) -> dict:
    """A config as JSON-able plain data (tuples become lists): for checkpoints and config.yaml."""
    return json.loads(json.dumps(value))


def _write_config(path: Path, cfg: TrainConfig) -> None:
    import yaml

    atomic_write(path, yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))


def load_config(path: str) -> TrainConfig:
    """A TrainConfig from a YAML file (a partial dict is fine: missing keys keep their defaults)."""
    import yaml

    with open(path) as f:
        return from_dict(TrainConfig, yaml.safe_load(f) or {})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = load_config(args.config) if args.config else TrainConfig()
    if args.preset:
        cfg.preset = args.preset
    if args.data:
        cfg.data.train = tuple(args.data)
    if args.val_data is not None:
        cfg.data.val = args.val_data
    if args.out:
        cfg.output_dir = args.out
    split_overrides(cfg, args.overrides)
    return cfg


def split_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Applies `key=value` items: TrainConfig keys in place, ModelConfig keys (or model.<key>)
    appended to cfg.model_overrides after checking them against the preset."""
    from proscale.presets import get_preset

    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_items = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        head = key.split(".", 1)[0]
        if head == "model":
            model_items.append(item.split(".", 1)[1])
        elif head in train_keys:
            apply_overrides(cfg, [item])
        else:
            model_items.append(item)
    if model_items:
        apply_overrides(get_preset(cfg.preset), model_items)  # fail now on a typo, not after data loading
        cfg.model_overrides = tuple(cfg.model_overrides) + tuple(model_items)
    return cfg


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model (also under torchrun)",
                              description=__doc__.split("\n\nWhat one iteration")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="model preset (proscale.presets), e.g. proscale_r50_333, m2f_tiny")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="training data, e.g. coco-panoptic:/data/coco (repeat to concatenate)")
    p.add_argument("--val-data", metavar="SPEC", help="validation data for periodic evaluation")
    p.add_argument("--out", help="output folder (checkpoints, metrics.jsonl)")
    p.add_argument("--config", help="YAML TrainConfig (e.g. a run's config.yaml); flags and key=value win")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="TrainConfig keys (iterations=, batch_size=, solver.lr=, data.image_size=, ...) or "
                        "model keys (encoder.plan=3,3,3, backbone.freeze_bn=true, model.<key>=...)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from proscale.data import DataError

    cfg = config_from_args(args)
    try:
        result = train(cfg, resume=args.resume)
    except DataError as e:
        print(f"error: {e}\n(data.skip_bad_samples=true skips such samples; proscale validate-data lists them all)",
              file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # --resume found checkpoints but none it may continue from
        print(f"error: {e}", file=sys.stderr)
        return 4
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in ("status", "iteration", "checkpoint")}))
    return 0
