"""Training recipes: the solver, loss and inference settings that make a preset learn.

`SmallRecipe` trains the CPU-sized segmentation presets (m2f_nano / proscale_nano_*, m2f_tiny /
proscale_tiny_333) from scratch on small images in minutes; `proscale quickstart` and
`proscale tradeoff` use it. (The COCO recipe of the full-size presets is TrainConfig's defaults:
docs/method.md, training recipe.)
"""
from __future__ import annotations

from dataclasses import dataclass

from proscale.config import DataConfig, InferenceConfig, LossConfig, SolverConfig, TrainConfig


@dataclass
class SmallRecipe:
    """Every value is fixed: the same command gives the same weights on any machine, however busy."""

    iterations: int = 800
    batch_size: int = 4  # more, smaller steps learn faster in a few minutes than fewer large ones
    lr: float = 2e-3  # from scratch, small batch: the COCO recipe's 1e-4 barely moves in 800 steps
    schedule: str = "poly"
    warmup_iters: int = 50
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    class_weight: float = 2.0
    no_object_weight: float = 0.1
    points_fraction: float = 0.25  # sampled points per mask = this * H * W, at most Mask2Former's 12,544
    checkpoint_period: int = 200
    # Mask2Former's COCO values are 0.8 / 0.8; a model trained for minutes is rarely that sure.
    object_mask_threshold: float = 0.5
    overlap_threshold: float = 0.5

    def train_config(self, *, preset: str, data: str, image_size: int, output_dir: str, seed: int = 0,
                     model_overrides: tuple[str, ...] = (), device: str = "cpu", progress: bool = False,
                     stop_after: int = 0) -> TrainConfig:
        """The engine's TrainConfig of one run of `preset` on the data spec `data` (images of
        `image_size`, trained at their own size with flips)."""
        return TrainConfig(
            preset=preset,
            model_overrides=tuple(model_overrides),
            output_dir=output_dir,
            progress=progress,
            data=DataConfig(train=(data,), val="", augmentation="none", flip=True, image_size=image_size,
                            min_size_test=0, num_workers=0),
            solver=SolverConfig(lr=self.lr, schedule=self.schedule, warmup_iters=self.warmup_iters,
                                weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                                backbone_multiplier=1.0),  # from scratch: the backbone learns as fast as the rest
            loss=LossConfig(num_points=max(64, min(12544, int(self.points_fraction * image_size * image_size))),
                            class_weight=self.class_weight, no_object_weight=self.no_object_weight),
            test=InferenceConfig(object_mask_threshold=self.object_mask_threshold,
                                 overlap_threshold=self.overlap_threshold, semantic_on=True),
            iterations=self.iterations,
            batch_size=self.batch_size,
            seed=seed,
            device=device,
            eval_period=0,
            checkpoint_period=self.checkpoint_period,
            keep_last=1,
            log_period=max(1, min(10, self.iterations // 20)),
            stop_after=stop_after,
        )


@dataclass
class DetectionRecipe(SmallRecipe):
    """SmallRecipe for the CPU-sized detectors (ddetr_nano / proscale_ddetr_nano_*) from scratch:
    a lower learning rate and tighter gradient clipping (Deformable DETR clips at 0.1), which
    `proscale quickstart --task detection` trains with. The loss weights are LossConfig's
    detection defaults (focal 2, L1 5, GIoU 2)."""

    lr: float = 1e-3
    clip_grad: float = 0.1
