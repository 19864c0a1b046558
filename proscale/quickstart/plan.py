"""Stage 2, the plan: iterations per model within the time budget, and the run's identity; also
the CPU thread count the job runs with.

OUT/plan.json holds {"iterations", "reason", "batch_size", "data", "training", "id", ...}. Both
models get the same iterations. The number is the recipe's (`max_iterations`) unless the time
budget cannot hold it: then a short timing of both models on this machine lowers it. `id` is a
hash of the data, the training settings and the iterations: every later stage stamps its
results with it, so that a change of any of them redoes exactly what depends on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from proscale.data import build_dataloader
from proscale.distributed import resolve_device
from proscale.engine.optim import build_optimizer, clip_and_norm
from proscale.engine.train import build_model_config, build_train_dataset
from proscale.fileio import read_json, write_json
from proscale.models.criterion import build_criterion
from proscale.models.maskformer import build_maskformer
from proscale.quickstart.config import MODELS, QuickstartConfig, data_params
from proscale.quickstart.console import say
from proscale.quickstart.train_config import train_config


def time_training_step(cfg: QuickstartConfig, preset: str, steps: int = 5, warmup: int = 2) -> float:
    """Seconds per training iteration of `preset` here: the fastest of `steps` iterations after
    `warmup`, each loading its batch from disk, with the data, model, loss and optimizer of the
    real run."""
    tcfg = train_config(cfg, "timing", preset, cfg.max_iterations)
    device = resolve_device(cfg.device)
    dataset, metadata = build_train_dataset(tcfg)
    torch.manual_seed(cfg.seed)
    model = build_maskformer(build_model_config(tcfg, metadata.num_classes)).to(device).train()
    criterion = build_criterion(model.num_classes, tcfg.loss).to(device)
    optimizer = build_optimizer(model, tcfg.solver)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = build_dataloader(dataset, tcfg.batch_size, train=True, num_workers=0, seed=cfg.seed)
    batches = iter(loader)
    times = []
    for i in range(steps + warmup):
        start = time.perf_counter()
        batch = next(batches)
        images = [im.to(device) for im in batch["images"]]  # each (3, H, W)
        targets = [{k: t[k].to(device) for k in ("labels", "masks")} for t in batch["targets"]]
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out = model(images)
        loss = criterion.total_loss(criterion(out, targets))
        loss.backward()
        clip_and_norm(params, tcfg.solver.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    # The fastest step, not the median: a burst of other work on a shared machine during these
    # few steps once made the plan 20 iterations instead of 800 (useless results); a plan that
    # overruns the budget a little under sustained load is the lesser harm.
    return min(times)


def training_settings(cfg: QuickstartConfig) -> dict:
    """What, besides the data and the iterations, decides the trained weights."""
    keys = ("seed", "batch_size", "lr", "schedule", "warmup_iters", "weight_decay", "clip_grad", "class_weight",
            "no_object_weight", "points_fraction", "extra_overrides", "object_mask_threshold", "overlap_threshold")
    out = {k: getattr(cfg, k) for k in keys}
    out["extra_overrides"] = list(cfg.extra_overrides)
    out["models"] = [list(m) for m in MODELS]
    return out


def planned_iterations(cfg: QuickstartConfig, started: float) -> dict:
    """{"iterations", "reason", ...}: the recipe's iterations, or fewer when a timing of both
    models says the rest of the budget (counted from `started`, a perf_counter time) cannot
    hold them."""
    if cfg.iterations > 0:
        return {"iterations": cfg.iterations, "reason": "--iterations"}
    say("[2/6] plan: timing a few training steps of each model to fit the budget ...")
    sec = {key: time_training_step(cfg, preset) for key, _, preset in MODELS}
    remaining = cfg.budget_minutes * 60 - (time.perf_counter() - started)
    # Evaluation, measurement and the report: ~20 s on 2 CPU cores at 128 px; keep 30 s + 10%.
    train_budget = max(0.0, 0.9 * remaining - 30)
    # The engine's loop costs a little more than the step timed here (logging, checkpoints,
    # the lr schedule, steps getting dearer as the masks sharpen and the matching changes).
    per_iter = sum(sec.values()) * 1.15
    fit = int(train_budget / per_iter) if per_iter > 0 else cfg.max_iterations
    iterations = max(cfg.min_iterations, min(cfg.max_iterations, fit))
    reason = ("the recipe's iterations fit the budget" if fit >= cfg.max_iterations else
              f"lowered from {cfg.max_iterations} to fit the {cfg.budget_minutes:g}-minute budget")
    return {"iterations": iterations, "reason": reason, "seconds_per_iteration": sec,
            "budget_minutes": cfg.budget_minutes}


def stage_plan(cfg: QuickstartConfig, started: float) -> dict:
    """OUT/plan.json (see the module doc). Kept when it exists for the same data and settings
    (a re-run does not re-time)."""
    path = Path(cfg.out) / "plan.json"
    plan = read_json(path)
    same = plan and plan.get("data") == data_params(cfg) and plan.get("training") == training_settings(cfg)
    if same and (not cfg.iterations or plan["iterations"] == cfg.iterations):
        say(f"[2/6] plan: {plan['iterations']} iterations per model (from {path})")
        return plan
    plan = planned_iterations(cfg, started)
    plan.update(batch_size=cfg.batch_size, data=data_params(cfg), training=training_settings(cfg))
    identity = json.dumps([plan["data"], plan["training"], plan["iterations"]], sort_keys=True)
    plan["id"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
    write_json(path, plan)
    say(f"[2/6] plan: {plan['iterations']} iterations per model, batch {cfg.batch_size} ({plan['reason']})")
    return plan


# ------------------------------------------------------------------------------ CPU threads
def auto_threads(device: torch.device) -> int | None:
    """CPU threads for this run: one per core that other work leaves idle right now (at least 1,
    at most torch's default); None (torch's default) on a GPU. On an oversubscribed CPU torch's
    OpenMP threads wait for one another: a training step measured 20x slower with 2 threads on 2
    cores while another job ran, and 1 thread avoids that."""
    if device.type != "cpu":
        return None
    default = torch.get_num_threads()
    idle = idle_cores()
    if idle is None:
        return default
    return max(1, min(default, int(idle + 0.5)))


def idle_cores(seconds: float = 0.5) -> float | None:
    """Cores idle over the next `seconds` (Linux /proc/stat), else from the 1-minute load average
    (which lags: it still counts a job that ended a minute ago); None when neither is readable."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + (values[4] if len(values) > 4 else 0), sum(values)  # idle + iowait, total

    cores = os.cpu_count() or 1
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
        if total1 > total0:
            return cores * (idle1 - idle0) / (total1 - total0)
    except (OSError, ValueError, IndexError):
        pass
    load = loadavg()
    return None if not load else cores - load[0]


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
