"""The training step and the loop, with after-step hooks (in the spirit of detectron2's
train_loop.py): `Trainer.run(hooks)` calls `trainer.step()` until the last iteration or until a
hook sets `trainer.status`; checkpointing, evaluation, logging and stopping are hooks
(proscale/engine/hooks.py). Building a Trainer from a TrainConfig is proscale/engine/train.py's job.

What one iteration (optimizer step) does
- `batch_size` is the *global* batch: each of the W processes runs `solver.accumulate` micro-batches
  of batch_size / (W * accumulate) images. Micro-batch k of rank r is global micro-batch
  g = k * W + r: torch's RNG (point sampling, drop path) is seeded from (seed, iteration, g), and the
  data order from (seed, epoch), so the result does not depend on how the global batch is split:
  W processes give the weights one process gets with accumulate=W (tests/test_ddp.py checks this).
- Mask losses are normalised by the number of target masks in the whole global batch (as
  Mask2Former does across GPUs), also across accumulation steps; the class loss is averaged.
- AMP (CUDA only): autocast fp16 (with a GradScaler) or bf16, the pixel decoder in fp32.
- Full-model gradient clipping at solver.clip_grad; a step whose loss (on any process) or gradient
  is not finite is skipped: no update, BatchNorm statistics restored, the iteration still counted.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from proscale import distributed as du
from proscale.config import TrainConfig
from proscale.data.collate import mix_seed
from proscale.engine.optim import clip_and_norm
from proscale.models.distill import feature_distill_loss


class HookBase:
    """Called by `Trainer.run`: before_train, after_step (after every iteration, in hook order;
    a hook that sets `trainer.status` ends the run: later hooks of that iteration are skipped),
    after_train (always, also after an error: `trainer.status` is then "failed")."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


@dataclass
class StepResult:
    """What one iteration left: the loss vector (unweighted losses averaged over micro-batches,
    then the weighted total), the gradient norm, whether the step was skipped, seconds taken."""

    losses: torch.Tensor
    grad_norm: float
    skipped: bool
    seconds: float
    bad_samples: int = 0  # samples replaced by SkipBadSamples in this step (this rank)


def step_seed(seed: int, iteration: int, micro_batch: int) -> int:
    """The RNG seed of global micro-batch `micro_batch` of `iteration` (mixed as the data loader
    mixes its sample seeds)."""
    return mix_seed(seed, iteration, micro_batch)


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
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._set_epoch(self.loader, self.epoch, 0)
            self._it = iter(self.loader)
            return next(self._it)


def to_device(batch: dict, device: torch.device) -> tuple[list, list]:
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in batch["images"]]
    targets = [{"labels": t["labels"].to(device, non_blocking=nb), "masks": t["masks"].to(device, non_blocking=nb)}
               for t in batch["targets"]]
    return images, targets


# Losses that are means over a micro-batch (averaged over micro-batches); the others are sums over
# masks, normalised by the global batch's mask count (loss_scales).
PER_BATCH_MEANS = ("loss_ce", "loss_distill")


def loss_scales(batch_list: list[dict], world: int, device: torch.device) -> tuple[list[float], float]:
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


def keep_fp32(module: nn.Module) -> nn.Module:
    """Runs `module` with autocast disabled and float32 inputs (docs/method.md, training recipe:
    the pixel decoder, whose deformable attention and sampling offsets are sensitive, stays fp32
    under AMP)."""
    forward = module.forward

    def fp32_forward(features):
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return forward({k: v.float() for k, v in features.items()})

    module.forward = fp32_forward
    return module


@dataclass
class Trainer:
    """One training run on this process: what a step needs, and where the run stands.

    `model` is the bare module (checkpoints, evaluation); `ddp_model` what the step calls (the
    same module, wrapped in DistributedDataParallel when there are several processes)."""

    cfg: TrainConfig
    info: du.DistInfo
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: object  # the training DataLoader (this rank's shard)
    micro: int  # images per forward on this process
    out: Path
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: no AMP
    metadata: object = None  # training data set metadata (stored in checkpoints)
    iteration: int = 0
    consumed: int = 0  # batches of this rank already used (resume)
    resumed_from: Path | None = None
    loss_keys: list[str] = field(default_factory=list)
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient in this run
    nonfinite_in_a_row: int = 0  # ... consecutive, up to the last step
    last: StepResult | None = None
    status: str | None = None  # set by a hook to end the run: "stopped", "interrupted"
    ddp_model: nn.Module | None = None
    teacher: nn.Module | None = None  # distillation targets (models/distill.FeatureTeacher); None: off

    def __post_init__(self):
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # BatchNorm statistics change in every forward: a skipped step puts them back.
        self._running_stats = [b for m in self.model.modules()
                               if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
                               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]

    @property
    def device(self) -> torch.device:
        return self.info.device

    # ------------------------------------------------------------------ the loop
    def run(self, hooks: list[HookBase]) -> str:
        """Steps until cfg.iterations or until a hook sets `status`; returns the status
        ("completed", "stopped", "interrupted")."""
        self.ddp_model = du.wrap_model(self.model, self.info, self.cfg.find_unused_parameters)
        stream = BatchStream(self.loader, self.consumed)
        self.model.train()
        try:
            for hook in hooks:
                hook.before_train(self)
            while self.iteration < self.cfg.iterations and self.status is None:
                start = time.perf_counter()
                batches = [next(stream) for _ in range(self.cfg.solver.accumulate)]
                bad = sum(len(events) for b in batches for events in b.get("skipped", ()))
                losses, grad_norm, skipped = self.step(batches)
                self.last = StepResult(losses, grad_norm, skipped, time.perf_counter() - start, bad)
                for hook in hooks:
                    hook.after_step(self)
                    if self.status is not None:
                        break
            if self.status is None:
                self.status = "completed"
        except BaseException:
            self.status = "failed"
            raise
        finally:
            for hook in hooks:
                hook.after_train(self)
        return self.status

    # ------------------------------------------------------------------ one step
    def step(self, batches: list[dict]) -> tuple[torch.Tensor, float, bool]:
        """One optimizer step over this process's micro-batches; returns (loss vector, gradient
        norm, skipped). When the total loss (on any rank) or the gradient norm is not finite the
        step is skipped: no optimizer update, BatchNorm running statistics put back, so the model
        is exactly as before; the iteration still counts (its data and lr-schedule place are used)."""
        W, A, rank = self.info.world_size, len(batches), self.info.rank
        mask_scale, ce_scale = loss_scales(batches, W, self.device)
        saved_stats = [b.clone() for b in self._running_stats]
        use_amp = self.amp_dtype is not None
        loss_vec = None
        for k, batch in enumerate(batches):
            torch.manual_seed(step_seed(self.cfg.seed, self.iteration, k * W + rank))
            images, targets = to_device(batch, self.device)
            sync = self.ddp_model.no_sync() if (self.info.distributed and k < A - 1) else contextlib.nullcontext()
            with sync:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=use_amp):
                    outputs = self.ddp_model(images)
                losses = self.criterion(outputs, targets)
                if self.teacher is not None:
                    losses["loss_distill"] = feature_distill_loss(outputs["pixel_decoder"], self.teacher(images))
                if not self.loss_keys:
                    self.loss_keys = list(losses)
                total = sum(self.criterion.weight(n) * v * (ce_scale if n.startswith(PER_BATCH_MEANS) else mask_scale[k])
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
        loss_bad = du.all_reduce_tensor((~torch.isfinite(loss_vec[-1])).float(), "max")
        loss_ok = loss_bad.item() == 0.0
        grad_ok = math.isfinite(grad_norm)
        if loss_ok and (grad_ok or self.scaler.is_enabled()):
            self.scaler.step(self.optimizer)  # optimizer.step(); with fp16 it skips inf gradients itself
        skipped = not (loss_ok and grad_ok)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        if skipped:
            self.nonfinite_steps += 1
            with torch.no_grad():
                for buf, old in zip(self._running_stats, saved_stats):
                    buf.copy_(old)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.iteration += 1
        return loss_vec, grad_norm, skipped
