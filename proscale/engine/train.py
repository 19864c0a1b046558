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
start over on top of them. One run per output folder: a second run into a folder in use stops
at once, naming the process that holds it (exit status 5; proscale/engine/run_lock.py).
Exit status: 0 done or interrupted (SIGINT / SIGTERM, checkpoint saved), 2 bad data, 3 too many
non-finite steps (checkpoint saved), 4 nothing to resume from, 5 output folder in use.

`key=value` overrides: keys of TrainConfig (iterations=, batch_size=, solver.lr=, data.image_size=,
loss.num_points=, test.overlap_threshold= ...) or of the preset's ModelConfig
(encoder.plan=3,3,3, backbone.freeze_bn=true, decoder.num_queries=50, or model.<key>=).

What one iteration does: proscale/engine/loop.py. After each one the hooks of
proscale/engine/hooks.py log, guard against non-finite steps, stop on SIGINT / SIGTERM (the
current iteration finishes and a checkpoint is saved; a second SIGINT interrupts at once),
checkpoint and evaluate. Checkpoints are written atomically and only then does last_checkpoint
move to them: a crash (even SIGKILL or power loss) loses at most the iterations since the last one.
Outputs (rank 0 only) in `output_dir`: metrics.jsonl (one JSON object per logged iteration and
per evaluation), model_XXXXXXX.pt checkpoints (the last `keep_last` kept), model_final.pt,
last_checkpoint, config.yaml, log.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

from proscale import distributed as du
from proscale.checkpoints.io import CheckpointError
from proscale.config import DetrConfig, ModelConfig, TrainConfig, apply_overrides, from_dict, to_dict
from proscale.engine import checkpointer
from proscale.engine.checkpointer import plain
from proscale.engine.evaluate import evaluation_tasks
from proscale.engine.hooks import (FinalCheckpoint, MetricsLog, MetricsWriter, NonFiniteGuard, NonFiniteLossError,
                                   PeriodicCheckpointer, PeriodicEvaluator, StopOnSignal)
from proscale.engine.loop import Trainer, keep_fp32
from proscale.engine.optim import build_lr_scheduler, build_optimizer
from proscale.engine.run_lock import RunFolderBusy, RunLock
from proscale.engine.summary import log_startup
from proscale.fileio import atomic_write

logger = logging.getLogger("proscale.train")

__all__ = ["TrainConfig", "NonFiniteLossError", "RunFolderBusy", "train", "build_trainer", "build_model_config",
           "split_overrides", "load_config"]


# ---------------------------------------------------------------------------------- building
def build_model_config(cfg: TrainConfig, num_classes: int) -> ModelConfig | DetrConfig:
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


def build_trainer(cfg: TrainConfig, info: du.DistInfo) -> tuple[Trainer, object, object]:
    """The Trainer of this process, plus the validation loader and its metadata (None without
    validation data). Every rank builds the same initial weights (seeded by cfg.seed)."""
    from proscale.data import build_dataloader
    from proscale.checkpoints.loader import load_model
    from proscale.checkpoints.warm_start import warm_start
    from proscale.models.criterion import build_criterion
    from proscale.models.distill import FeatureTeacher
    from proscale.models.detr import build_detr
    from proscale.models.detr.criterion import build_detr_criterion
    from proscale.models.maskformer import build_maskformer
    from proscale.recipes import resolve_derived

    W, A = info.world_size, cfg.solver.accumulate
    if A < 1 or cfg.batch_size % (W * A):
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of processes x accumulate = {W} x {A}")
    micro = cfg.batch_size // (W * A)  # images per forward on this process
    dataset, metadata = build_train_dataset(cfg)
    derived = resolve_derived(cfg, dataset)  # before the val transforms, which use the test size
    if derived and info.is_main:
        logger.info("derived from the data: %s", ", ".join(derived))
    val_dataset = build_val_dataset(cfg)
    mcfg = build_model_config(cfg, metadata.num_classes)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # The model family follows from the preset's config type: a DetrConfig is a detector.
    detection = isinstance(mcfg, DetrConfig)
    if detection:
        model = build_detr(mcfg).to(info.device)
        criterion = build_detr_criterion(mcfg.num_classes, cfg.loss, metadata.thing_classes)
    else:
        model = build_maskformer(mcfg).to(info.device)
        criterion = build_criterion(mcfg.num_classes, cfg.loss)
    if cfg.init:
        report = warm_start(model, cfg.init, class_names=[c.name for c in metadata.categories],
                            layer_map=cfg.init_layer_map)
        if info.is_main:
            logger.info("%s", report.table())
    teacher = None
    if cfg.loss.distill_from:
        if detection:
            raise ValueError("loss.distill_from: feature distillation is for segmentation models (MaskFormer)")
        teacher = FeatureTeacher(load_model(cfg.loss.distill_from, device=info.device)[0])
        model.keep_features = True
    use_amp = cfg.solver.amp and info.device.type == "cuda"
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.solver.amp_dtype]
    if use_amp and not detection:
        keep_fp32(model.pixel_decoder)
    optimizer = build_optimizer(model, cfg.solver)
    trainer = Trainer(
        cfg=cfg, info=info, model=model, criterion=criterion.to(info.device),
        optimizer=optimizer, scheduler=build_lr_scheduler(optimizer, cfg.solver, cfg.iterations),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16),
        loader=build_dataloader(dataset, micro, train=True, num_workers=cfg.data.num_workers, seed=cfg.seed,
                                distributed=info.distributed),
        micro=micro, out=Path(cfg.output_dir), amp_dtype=amp_dtype if use_amp else None, metadata=metadata,
        teacher=teacher)
    if val_dataset is None:
        return trainer, None, None
    val_loader = build_dataloader(val_dataset, 1, train=False, num_workers=cfg.data.num_workers,
                                  distributed=info.distributed)
    # Evaluation scores against the val split's own ground truth (its paths live in its metadata).
    return trainer, val_loader, val_dataset.metadata


# ---------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Trains as `cfg` says; returns {"status", "iteration", "output_dir", "checkpoint", "losses",
    "eval", "nonfinite_steps"}. Under torchrun every process calls it. `resume`: continue from the
    newest checkpoint in cfg.output_dir that loads (a fresh start when there is none; CheckpointError
    when there are some but none can be resumed from: see proscale.engine.checkpointer.resume).
    Raises RunFolderBusy when another process is training into cfg.output_dir."""
    cfg = copy.deepcopy(cfg)  # settings derived from the data are filled in (recipes.resolve_derived)
    info = du.init_distributed(cfg.device)
    out = Path(cfg.output_dir)
    log_state = (logger.level, logger.propagate)
    with contextlib.ExitStack() as stack:
        stack.callback(du.cleanup, info)
        busy = None
        if info.is_main:
            try:
                stack.enter_context(RunLock(out))  # before anything is written into the folder
            except RunFolderBusy as e:
                busy = str(e)
        busy = du.broadcast_object(busy)  # every rank stops when the folder is taken
        if busy:
            raise RunFolderBusy(busy)
        if info.is_main:
            handlers = _attach_log_handlers(out / "log.txt")
            stack.callback(_detach_log_handlers, handlers, log_state)
        trainer, val_loader, val_metadata = build_trainer(cfg, info)
        if info.is_main:
            train_set = trainer.loader.dataset
            train_set = getattr(train_set, "dataset", train_set)  # the loader's SeededDataset wraps it
            log_startup(logger, cfg, trainer.model, train_set,
                        val_loader.dataset if val_loader is not None else None, trainer.metadata)
        if resume:
            checkpointer.resume(trainer)
        log = MetricsLog(out / "metrics.jsonl", info.is_main, cfg.tensorboard)
        stack.callback(log.close)
        if trainer.resumed_from is not None:
            log.truncate_after(trainer.iteration)
        if info.is_main:
            atomic_write(out / "config.yaml", _yaml(cfg))
        writer = MetricsWriter(log, cfg.progress, cfg.max_nonfinite)
        evaluator = None
        hooks = [writer, NonFiniteGuard(cfg.max_nonfinite), StopOnSignal(cfg.stop_after),
                 PeriodicCheckpointer(cfg.checkpoint_period)]
        if val_loader is not None:
            tasks, note = evaluation_tasks(cfg.test, val_metadata)  # a detector evaluates box AP whatever they are
            if note and info.is_main and not isinstance(trainer.model.cfg, DetrConfig):
                logger.warning("evaluation: %s", note)
            evaluator = PeriodicEvaluator(val_loader, val_metadata, tasks, log, cfg.eval_period)
            hooks.append(evaluator)
        final = FinalCheckpoint()
        hooks.append(final)
        status = trainer.run(hooks)
        return {"status": status, "iteration": trainer.iteration, "output_dir": str(out),
                "checkpoint": str(final.path), "losses": writer.last_record,
                "eval": evaluator.results if evaluator else {}, "nonfinite_steps": trainer.nonfinite_steps}


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




def _detach_log_handlers(handlers: list[logging.Handler], state: tuple[int, bool]) -> None:
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(state[0])
    logger.propagate = state[1]


def _yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)


# ---------------------------------------------------------------------------------- the command
def load_config(path: str) -> TrainConfig:
    """A TrainConfig from a YAML file (a partial dict is fine: missing keys keep their defaults)."""
    import yaml

    with open(path) as f:
        return from_dict(TrainConfig, yaml.safe_load(f) or {})


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--config YAML (e.g. a run's config.yaml), else the recipe (--recipe, default: the preset's);
    then the flags and key=value items. A key=value that the resulting config ignores is an error."""
    from proscale.recipes import check_ignored, recipe_config

    if args.config:
        cfg = load_config(args.config)
        if args.recipe:
            raise ValueError("--config and --recipe: choose one (a config file holds the whole recipe)")
        if args.preset:
            cfg.preset = args.preset
    else:
        cfg = recipe_config(args.recipe, args.preset or TrainConfig.preset)
    if args.data:
        cfg.data.train = tuple(args.data)
    if args.val_data is not None:
        cfg.data.val = args.val_data
    if args.out:
        cfg.output_dir = args.out
    if args.init:
        cfg.init = args.init
    split_overrides(cfg, args.overrides)
    check_ignored(cfg, [o.split("=", 1)[0].strip() for o in args.overrides])
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
    p.add_argument("--recipe", help="training recipe (proscale/recipes/*.yaml: coco, ade20k, small); default: the "
                                    "preset's (small for *_nano / *_tiny, else coco)")
    p.add_argument("--config", help="YAML TrainConfig (e.g. a run's config.yaml) instead of a recipe; flags and "
                                    "key=value win")
    du.add_threads_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from these weights (proscale .pt, detectron2 .pkl, PRO-SCALE .pth, transformers "
                        "folder / .safetensors): what fits is loaded, the class head follows the data's classes, "
                        "a Mask2Former encoder is mapped onto a PRO-SCALE plan; prints what was loaded")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="TrainConfig keys (iterations=, batch_size=, solver.lr=, data.image_size=, ...) or "
                        "model keys (encoder.plan=3,3,3, backbone.freeze_bn=true, model.<key>=...)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from proscale.data import DataError

    du.set_threads(args.threads)
    try:
        cfg = config_from_args(args)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
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
    except RunFolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in ("status", "iteration", "checkpoint")}))
    return 0
