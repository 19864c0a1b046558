"""What the quickstart does (QuickstartConfig), the two models it compares (MODELS; DET_MODELS
for --task detection), and where
its results lie under OUT.

    OUT/data               the synthetic panoptic set (data_root)
    OUT/runs/<model key>/seed<k>   one training run of the engine and its evaluation (run_dir)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from proscale.data import build_dataset
from proscale.data.synthetic import SyntheticParams
from proscale.recipes import SmallRecipe

# (key used for folders and files, display name, preset). The first is the baseline. The
# PRO-SCALE model is the setting `proscale tradeoff` recommends on this data (docs/tradeoff.md):
# plan (3,3,1) with the 3x3 conv, 0.51x the baseline's pixel-decoder GFLOPs. The released
# (3,3,3) with LPE trails here by 1.5 PQ, all of it mask-boundary quality: LPE's stride-4
# max-pool blurs a 128 px image's boundaries by 4 px.
MODELS: tuple[tuple[str, str, str], ...] = (
    ("m2f", "Mask2Former", "m2f_nano"),
    ("proscale", "PRO-SCALE (3,3,1) conv", "proscale_nano_331_conv"),
)

# `proscale quickstart --task detection` (quickstart/detection.py): the detectors, the first the
# baseline. PRO-SCALE (2,2,2,2): two layers per stage, the last two over all four levels (strides
# 64, 32, 16, 8): 0.43x the plain encoder's GFLOPs at 800x1333 (docs/detection.md).
DET_MODELS: tuple[tuple[str, str, str], ...] = (
    ("ddetr", "Deformable DETR", "ddetr_nano"),
    ("proscale", "PRO-SCALE (2,2,2,2)", "proscale_ddetr_nano_2222"),
)


@dataclass
class QuickstartConfig:
    """Everything the quickstart does. The defaults are what `make quickstart` runs: a fixed
    recipe, so the same command gives the same table on any machine, however busy (only the
    latency columns and the time it takes change)."""

    out: str = "runs/quickstart"
    # The time the job should take on an idle 2-core CPU; only for the ETA and a warning when this
    # machine is slower or busy: it never changes what is trained.
    budget_minutes: float = 10.0
    device: str = "cpu"  # the trainings run on CPU processes; "cuda" measures latency on a GPU
    workers: int = 0  # training processes, one thread each (0: one per core)
    seed: int = 0  # the data's seed and the first training seed
    seeds: int = 2  # trainings per model (seeds seed, seed+1, ...): the report shows their spread

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

    # --- training: the same recipe for both models and every seed ---------------------------
    recipe: SmallRecipe = field(default_factory=SmallRecipe)
    stop_after: int = 0  # > 0: each training stops at this iteration (with a checkpoint); a re-run goes on
    extra_overrides: tuple[str, ...] = ()  # any further TrainConfig / model `key=value`

    # --- measurement / report ---------------------------------------------------------------
    latency_warmup: int = 3
    latency_repeats: int = 10
    latency_rounds: int = 3  # rounds of (baseline, PRO-SCALE), interleaved; median over all
    latency_large_size: int = 256  # also measure at this input size (0 = only the training size)
    num_overlays: int = 4
    progress: bool = True

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + k for k in range(self.seeds)]


# Named data settings (`proscale quickstart --setting NAME`): QuickstartConfig fields to change.
SETTINGS: dict[str, dict] = {
    "default": {},
    # Many small instances, 256 px, colours that do not follow the class: the class shows only in
    # the shape (things) or the texture and position (stuff).
    "hard": {"image_size": 256, "difficulty": "hard", "budget_minutes": 40.0,
             "synthetic": {"min_things": 4, "max_things": 12, "min_radius": 0.04, "max_radius": 0.1,
                           "class_colors": False}},
}


def with_setting(cfg: QuickstartConfig, name: str) -> QuickstartConfig:
    if name not in SETTINGS:
        raise ValueError(f"unknown quickstart setting {name!r}: choose from {', '.join(SETTINGS)}")
    return dataclasses.replace(cfg, **SETTINGS[name])


def data_root(cfg: QuickstartConfig) -> Path:
    return Path(cfg.out) / "data"


def data_spec(cfg: QuickstartConfig) -> str:
    """The data spec (proscale.data.build_dataset) of the generated set."""
    return f"synthetic:{data_root(cfg).resolve()}"


def run_dir(cfg: QuickstartConfig, key: str, seed: int | None = None) -> Path:
    """OUT/runs/<model key>/seed<k> (default: the first seed's run)."""
    return Path(cfg.out) / "runs" / key / f"seed{cfg.seed if seed is None else seed}"


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
