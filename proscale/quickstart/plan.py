"""Stage 2, the plan: the run's identity and its expected duration.

OUT/plan.json holds {"id", "data", "training", "iterations", "batch_size", "seeds", ...}. The
recipe is fixed (the `small` recipe, proscale/recipes/small.yaml): nothing here depends on this machine's speed or
load. `id` is a hash of the data, the training settings and the seeds: later stages stamp their
results with it, so that a change of any of them redoes exactly what depends on it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from proscale.fileio import read_json, write_json
from proscale.quickstart.config import MODELS, QuickstartConfig, data_params
from proscale.quickstart.console import say
from proscale.recipes import load_recipe

# Seconds per training iteration of the nano presets at 128 px, batch 4, one thread each, two
# trainings at once on the otherwise idle 2-core development CPU (AMD EPYC; m2f_nano 0.33,
# proscale_nano_333 0.28, `proscale tradeoff ... iterations=60`): only for the expected duration.
SECONDS_PER_ITERATION = 0.31


def training_settings(cfg: QuickstartConfig, models=MODELS) -> dict:
    """What, besides the data, decides the trained weights."""
    return {"recipe": dataclasses.asdict(cfg.recipe), "recipe_yaml": load_recipe(cfg.recipe.recipe),
            "seeds": cfg.seed_list, "extra_overrides": list(cfg.extra_overrides), "models": [list(m) for m in models]}


def expected_minutes(cfg: QuickstartConfig, workers: int, models=MODELS,
                     seconds_per_iteration: float = SECONDS_PER_ITERATION) -> float:
    """Training time on an idle CPU like the development machine's: jobs share `workers` cores."""
    jobs = len(models) * cfg.seeds
    rounds = -(-jobs // max(1, workers))
    area = (cfg.image_size / 128) ** 2  # a step's cost grows about with the number of pixels
    return rounds * cfg.recipe.iterations * seconds_per_iteration * area / 60


def stage_plan(cfg: QuickstartConfig, models=MODELS) -> dict:
    """OUT/plan.json (see the module doc)."""
    path = Path(cfg.out) / "plan.json"
    plan = {"data": data_params(cfg), "training": training_settings(cfg, models), "iterations": cfg.recipe.iterations,
            "batch_size": cfg.recipe.batch_size, "seeds": cfg.seed_list}
    plan["id"] = hashlib.sha256(json.dumps([plan["data"], plan["training"]], sort_keys=True).encode()).hexdigest()[:16]
    if read_json(path) != plan:
        write_json(path, plan)
    say(f"[2/6] plan: {len(models)} models x {cfg.seeds} seeds, {cfg.recipe.iterations} iterations of batch "
        f"{cfg.recipe.batch_size} each (a fixed recipe: the same on every machine)")
    return plan


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
