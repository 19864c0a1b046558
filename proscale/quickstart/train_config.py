"""The engine's TrainConfig of one quickstart model, built from QuickstartConfig with typed values.

Both models get the same config except the preset: same data, augmentation, solver, loss and
inference settings, so the comparison differs only in the model.
"""
from __future__ import annotations

from proscale.config import DataConfig, InferenceConfig, LossConfig, SolverConfig, TrainConfig
from proscale.engine.train import split_overrides
from proscale.quickstart.config import QuickstartConfig, data_spec, run_dir


def train_config(cfg: QuickstartConfig, key: str, preset: str, iterations: int) -> TrainConfig:
    """TrainConfig of the model `key` (OUT/runs/<key>) with `preset`, for `iterations` steps.
    `cfg.extra_overrides` (user `key=value` items) are applied last, as `proscale train` would."""
    data = DataConfig(
        train=(data_spec(cfg),),
        val="",  # evaluated by the quickstart's own stage, once
        augmentation="none",
        flip=True,
        min_size_test=0,  # test images keep their own size, as in training
        num_workers=0,
    )
    solver = SolverConfig(
        lr=float(cfg.lr),
        schedule=cfg.schedule,
        warmup_iters=int(cfg.warmup_iters),
        weight_decay=float(cfg.weight_decay),
        backbone_multiplier=1.0,  # trained from scratch: the backbone learns as fast as the rest
        clip_grad=float(cfg.clip_grad),
    )
    loss = LossConfig(
        num_points=max(64, int(cfg.points_fraction * cfg.image_size * cfg.image_size)),
        class_weight=float(cfg.class_weight),
        no_object_weight=float(cfg.no_object_weight),
    )
    test = InferenceConfig(
        object_mask_threshold=float(cfg.object_mask_threshold),
        overlap_threshold=float(cfg.overlap_threshold),
        semantic_on=True,
    )
    tcfg = TrainConfig(
        preset=preset,
        output_dir=str(run_dir(cfg, key)),
        progress=cfg.progress,
        data=data,
        solver=solver,
        loss=loss,
        test=test,
        iterations=int(iterations),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        device=cfg.device,
        eval_period=0,
        checkpoint_period=int(cfg.checkpoint_period),
        keep_last=1,
        log_period=max(1, min(10, iterations // 20)),
        stop_after=int(cfg.stop_after),
    )
    return split_overrides(tcfg, list(cfg.extra_overrides))
