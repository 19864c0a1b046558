"""What the quickstart does (QuickstartConfig), the two models it compares (MODELS), and where
its results lie under OUT.

    OUT/data               the synthetic panoptic set (data_root)
    OUT/runs/<model key>   one training run of the engine (run_dir)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from proscale.data import build_dataset
from proscale.data.synthetic import SyntheticParams

# (key used for folders and files, display name, preset). The first is the baseline.
MODELS: tuple[tuple[str, str, str], ...] = (
    ("m2f", "Mask2Former", "m2f_nano"),
    ("proscale", "PRO-SCALE (3,3,3)", "proscale_nano_333"),
)


@dataclass
class QuickstartConfig:
    """Everything the quickstart does. The defaults are the recipe `make quickstart` runs."""

    out: str = "runs/quickstart"
    budget_minutes: float = 6.5  # the whole job; the plan lowers iterations to fit (proscale/quickstart/plan.py)
    iterations: int = 0  # > 0: exactly this many per model, no timing (overrides the budget)
    device: str = "auto"  # "auto" (a GPU when present), "cpu", "cuda"
    threads: int = 0  # CPU threads (0 = auto: one per core that other work leaves idle, see auto_threads)
    seed: int = 0

    # --- data: generate_synthetic(...) arguments -----------------------------------------
    image_size: int = 128
    num_train: int = 1000
    num_val: int = 100
    difficulty: str = "easy"
    # SyntheticParams overrides: at most two large shapes (51-90 px across at 128 px), and colours
    # that follow the class (the category's colour + 25% of a random colour). With random colours
    # the class shows only in the outline, which a from-scratch model does not learn in minutes
    # (thing PQ stayed 0 after 600 iterations). Keys the installed generator lacks are dropped
    # with a warning.
    synthetic: dict = field(default_factory=lambda: {"min_radius": 0.2, "max_radius": 0.35, "max_things": 2,
                                                     "class_colors": True, "class_color_jitter": 0.25})

    # --- training (same for both models) --------------------------------------------------
    max_iterations: int = 800  # the recipe: iterations per model when the budget allows
    min_iterations: int = 20  # the plan never goes below this
    batch_size: int = 4  # more, smaller steps learn faster in a few minutes than fewer large ones
    lr: float = 2e-3  # from scratch, small batch: the COCO recipe's 1e-4 barely moves in 800 steps
    schedule: str = "poly"
    warmup_iters: int = 50
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    class_weight: float = 2.0
    no_object_weight: float = 0.1
    points_fraction: float = 0.25  # sampled points per mask = this * H * W (12,544 is for 1024 px)
    checkpoint_period: int = 200
    stop_after: int = 0  # > 0: each training stops at this iteration (with a checkpoint); a re-run goes on
    extra_overrides: tuple[str, ...] = ()  # any further TrainConfig / model `key=value`

    # --- inference (stated in the report) --------------------------------------------------
    # Mask2Former's COCO values are 0.8 / 0.8; a model trained for minutes is rarely that sure.
    object_mask_threshold: float = 0.5
    overlap_threshold: float = 0.5

    # --- measurement / report ---------------------------------------------------------------
    latency_warmup: int = 3
    latency_repeats: int = 10
    latency_rounds: int = 3  # rounds of (baseline, PRO-SCALE), interleaved; median over all
    latency_large_size: int = 256  # also measure at this input size (0 = only the training size)
    num_overlays: int = 4
    progress: bool = True


def data_root(cfg: QuickstartConfig) -> Path:
    return Path(cfg.out) / "data"


def data_spec(cfg: QuickstartConfig) -> str:
    """The data spec (proscale.data.build_dataset) of the generated set."""
    return f"synthetic:{data_root(cfg).resolve()}"


def run_dir(cfg: QuickstartConfig, key: str) -> Path:
    return Path(cfg.out) / "runs" / key


def val_dataset(cfg: QuickstartConfig):
    """The val split of the generated set (evaluation and overlays)."""
    return build_dataset(data_spec(cfg), "val")


def synthetic_overrides(cfg: QuickstartConfig) -> tuple[dict, list[str]]:
    """(the `cfg.synthetic` items the installed generator knows, the names it does not)."""
    known = {f.name for f in dataclasses.fields(SyntheticParams)}
    return ({k: v for k, v in cfg.synthetic.items() if k in known},
            sorted(k for k in cfg.synthetic if k not in known))


def data_params(cfg: QuickstartConfig) -> dict:
    """What decides the generated data (OUT/data/.complete, and part of the plan's identity)."""
    used, dropped = synthetic_overrides(cfg)
    return {"image_size": cfg.image_size, "num_train": cfg.num_train, "num_val": cfg.num_val, "seed": cfg.seed,
            "difficulty": cfg.difficulty, "synthetic": used, "synthetic_unsupported": dropped}
