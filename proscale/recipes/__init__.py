"""Training recipes: YAML files of TrainConfig settings beside this file, one per kind of run.

    coco             Mask2Former's COCO panoptic / instance recipe (the full-size presets)
    ade20k           Mask2Former's ADE20K semantic recipe
    small            from scratch on small images in minutes on a CPU (the nano / tiny presets)
    ddetr            Deformable DETR's COCO detection recipe (ddetr_r50*, proscale_ddetr_r50*)
    small_detection  `small` for the CPU-sized detectors (ddetr_nano*, proscale_ddetr_nano*)

A recipe may start from another one (`base: small`) and change some of its settings.

`proscale train --preset P` starts from `default_recipe(P)`; `--recipe NAME` picks another;
`key=value` items change it. Settings left at -1 / 0 in a recipe follow the data when the run
starts (`resolve_derived`): points per mask from the training image size, test size from the
training size. A key the chosen path ignores is an error (`ignored_keys`), not silence.
docs/recipes.md lists the recipes and the derived settings.
"""
from __future__ import annotations

import fnmatch
import statistics
from dataclasses import dataclass
from typing import ClassVar, Iterable
from pathlib import Path

import yaml

from proscale.config import TrainConfig, from_dict

RECIPE_DIR = Path(__file__).parent
# Presets -> their recipe (first match). The CPU-sized presets train from scratch in minutes.
PRESET_RECIPES = (("*ddetr_nano*", "small_detection"), ("*ddetr*", "ddetr"), ("*_nano*", "small"),
                  ("*_tiny*", "small"), ("*", "coco"))
MAX_POINTS = 12544  # Mask2Former's 112 x 112 points per mask


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict:
    """The recipe's settings (a partial TrainConfig dict, its `base` merged in); ValueError for an
    unknown name."""
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}: choose from {', '.join(list_recipes())}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    return _merge(load_recipe(base), data) if base else data


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def default_recipe(preset: str) -> str:
    return next(recipe for pattern, recipe in PRESET_RECIPES if fnmatch.fnmatch(preset, pattern))


def recipe_config(name: str | None = None, preset: str = "proscale_r50_333") -> TrainConfig:
    """A TrainConfig: the defaults, then recipe `name` (default: the preset's), for `preset`."""
    name = name or default_recipe(preset)
    cfg = from_dict(TrainConfig, load_recipe(name))
    cfg.preset, cfg.recipe = preset, name
    return cfg


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a nested dict: {"solver": {"lr": 1}} -> ["solver.lr"]."""
    out = []
    for key, value in tree.items():
        out += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


# ------------------------------------------------------------------------- derived settings
def _image_sides(dataset, limit: int = 64) -> list[float]:
    """sqrt(H W) of the data set's images: from COCO records when it has them, else from up to
    `limit` loaded samples."""
    from proscale.data.stats import segment_stats

    stats = segment_stats(dataset)
    if stats is not None and stats.image_sides:
        return stats.image_sides
    sides = []
    for i in range(min(limit, len(dataset))):
        h, w = dataset[i]["image"].shape[-2:]
        sides.append((h * w) ** 0.5)
    return sides


def training_side(cfg: TrainConfig, dataset=None) -> float:
    """The image side the model trains at: the LSJ crop, the resize mode's crop or middle short
    side, or (augmentation "none") the median image of `dataset`."""
    d = cfg.data
    if d.augmentation == "lsj":
        return float(d.image_size)
    if d.augmentation == "resize":
        return float(d.crop_size or statistics.median(d.min_size_train))
    sides = _image_sides(dataset) if dataset is not None else []
    return float(statistics.median(sides)) if sides else float(d.image_size)


def resolve_derived(cfg: TrainConfig, dataset=None) -> list[str]:
    """Fills the settings a recipe leaves to the data, in place; returns one line per setting.

    loss.num_points 0        -> points_fraction * side^2, within [64, 12544]
    data.min_size_test -1    -> LSJ: image_size * 800 / 1024; resize: the crop (or middle short side);
                                none: 0 (the images' own size)
    data.max_size_test -1    -> min_size_test * 1333 / 800 (resize: max_size_train)
    """
    lines = []
    if cfg.loss.num_points <= 0:
        side = training_side(cfg, dataset)
        cfg.loss.num_points = max(64, min(MAX_POINTS, int(cfg.loss.points_fraction * side * side)))
        lines.append(f"loss.num_points={cfg.loss.num_points} ({cfg.loss.points_fraction:g} x {side:.0f}^2 px)")
    d = cfg.data
    if d.min_size_test < 0:
        d.min_size_test = {"lsj": round(d.image_size * 800 / 1024),
                           "resize": int(d.crop_size or statistics.median(d.min_size_train))}.get(d.augmentation, 0)
        lines.append(f"data.min_size_test={d.min_size_test} (from the training size)")
    if d.max_size_test < 0:
        d.max_size_test = d.max_size_train if d.augmentation == "resize" else round(d.min_size_test * 1333 / 800)
        lines.append(f"data.max_size_test={d.max_size_test}")
    return lines


# ------------------------------------------------------------------------- ignored keys
def ignored_keys(cfg: TrainConfig) -> dict[str, str]:
    """Dotted keys that have no effect under `cfg`'s choices -> why."""
    d, s, out = cfg.data, cfg.solver, {}
    by_aug = {"lsj": ("min_size_train", "max_size_train", "crop_size"),
              "resize": ("image_size", "min_scale", "max_scale"),
              "none": ("image_size", "min_scale", "max_scale", "min_size_train", "max_size_train", "crop_size")}
    for key in by_aug.get(d.augmentation, ()):
        out[f"data.{key}"] = (f"data.augmentation={d.augmentation} does not use it"
                              + (" (images train at their own size)" if d.augmentation == "none" else ""))
    if s.schedule != "step":
        for key in ("steps", "step_fractions", "gamma"):
            out[f"solver.{key}"] = f"solver.schedule={s.schedule} has no steps"
    if s.schedule != "poly":
        out["solver.poly_power"] = f"solver.schedule={s.schedule} is not poly"
    if s.optimizer == "adamw":
        out["solver.momentum"] = "AdamW has no momentum setting (solver.betas)"
    else:
        out["solver.betas"] = out["solver.eps"] = f"solver.optimizer={s.optimizer} is not AdamW"
    if s.warmup_iters == 0:
        out["solver.warmup_factor"] = "solver.warmup_iters=0: no warmup"
    if cfg.loss.num_points > 0:
        out["loss.points_fraction"] = "loss.num_points is set (points_fraction applies when it is 0)"
    if not cfg.loss.distill_from:
        out["loss.distill_weight"] = "no loss.distill_from"
    if not cfg.init:
        out["init_layer_map"] = "no --init"
    return out


def check_ignored(cfg: TrainConfig, keys: Iterable[str]) -> None:
    """ValueError naming every key in `keys` (those the user set) that `cfg` ignores, and why."""
    ignored = ignored_keys(cfg)
    bad = [f"{k}: {ignored[k]}" for k in keys if k in ignored]
    if bad:
        raise ValueError("settings without effect (remove them, or change what makes them unused):\n  "
                         + "\n  ".join(bad))


# ------------------------------------------------------------------------- quickstart / tradeoff
@dataclass
class SmallRecipe:
    """The `small` recipe as `proscale quickstart` and `proscale tradeoff` run it: every other
    value is small.yaml's, so the same command gives the same weights on any machine, however busy."""

    recipe: ClassVar[str] = "small"
    iterations: int = 800
    batch_size: int = 4
    checkpoint_period: int | None = None  # None: the recipe's

    def train_config(self, *, preset: str, data: str, output_dir: str, seed: int = 0,
                     model_overrides: tuple[str, ...] = (), device: str = "cpu", progress: bool = False,
                     stop_after: int = 0) -> TrainConfig:
        """The engine's TrainConfig of one run of `preset` on the data spec `data`."""
        cfg = recipe_config(self.recipe, preset)
        cfg.model_overrides = tuple(model_overrides)
        cfg.output_dir, cfg.progress, cfg.seed, cfg.device, cfg.stop_after = output_dir, progress, seed, device, stop_after
        cfg.data.train, cfg.data.val = (data,), ""
        cfg.iterations, cfg.batch_size = self.iterations, self.batch_size
        cfg.log_period = max(1, min(10, self.iterations // 20))
        if self.checkpoint_period is not None:
            cfg.checkpoint_period = self.checkpoint_period
        return cfg


@dataclass
class DetectionRecipe(SmallRecipe):
    """The `small_detection` recipe, as `proscale quickstart --task detection` runs it."""

    recipe: ClassVar[str] = "small_detection"
