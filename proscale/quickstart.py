"""`proscale quickstart`: Mask2Former vs PRO-SCALE on built-in data, end to end, no download.

    proscale quickstart [--out runs/quickstart] [--budget-minutes 6.5]

Stages (each one first checks what OUT already holds, so a re-run resumes instead of starting over):
  1. data      OUT/data: the synthetic panoptic set (train + val, fixed seed; COCO panoptic layout),
               kept when OUT/data/.complete records the same generation parameters.
  2. plan      OUT/plan.json: iterations per model. Both models get the same iterations, batch, data
               order and seed. The number is the recipe's (`max_iterations`) unless the time budget
               cannot hold it: then a short timing of both models on this machine lowers it. Kept
               for the same data and settings (pass --iterations to choose the number yourself).
               Its `id` (data, settings, iterations) stamps every later result.
  3. train     OUT/runs/<model>: proscale.engine.train (metrics.jsonl, periodic checkpoints,
               model_final.pt). An interrupted run continues from its newest checkpoint (the
               engine's resume); a finished one of this plan is not touched; one of another plan is
               cleared first.
  4. evaluate  OUT/eval/<model>.json: PQ (things / stuff), mask AP and mIoU on the val split.
  5. measure   OUT/measure.json: GFLOPs per component (proscale.analysis.flops) and latency (median of
               repeated runs, both models interleaved in one process) of the pixel decoder and the
               whole model, at the training size and a larger one.
  6. report    OUT/report.md, OUT/report.html, OUT/plots/*.png, OUT/overlays/*.png (proscale.report),
               kept when its inputs did not change; then the comparison table is printed.

The model presets are `m2f_nano` and `proscale_nano_333` (proscale/presets.py); the data, training
and inference settings that make them learn on a CPU in minutes are the fields of
`QuickstartConfig`, each with the reason for its value. CPU by default (threads: see
`auto_threads`); a GPU is used when one is present (`--device`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from proscale.fileio import atomic_write

logger = logging.getLogger("proscale.quickstart")

# (key used for folders and files, display name, preset). The first is the baseline.
MODELS: tuple[tuple[str, str, str], ...] = (
    ("m2f", "Mask2Former", "m2f_nano"),
    ("proscale", "PRO-SCALE (3,3,3)", "proscale_nano_333"),
)


@dataclass
class QuickstartConfig:
    """Everything the quickstart does. The defaults are the recipe `make quickstart` runs."""

    out: str = "runs/quickstart"
    budget_minutes: float = 6.5  # the whole job; the plan lowers iterations to fit (see module doc)
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


# ------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=_json_default))


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _bar(cfg: QuickstartConfig, **kw):
    from tqdm import tqdm

    return tqdm(disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr, mininterval=0.5, **kw)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def data_root(cfg: QuickstartConfig) -> Path:
    return Path(cfg.out) / "data"


def run_dir(cfg: QuickstartConfig, key: str) -> Path:
    return Path(cfg.out) / "runs" / key


def synthetic_overrides(cfg: QuickstartConfig) -> tuple[dict, list[str]]:
    """(the `cfg.synthetic` items the installed generator knows, the names it does not)."""
    from proscale.data.synthetic import SyntheticParams

    known = {f.name for f in dataclasses.fields(SyntheticParams)}
    return ({k: v for k, v in cfg.synthetic.items() if k in known},
            sorted(k for k in cfg.synthetic if k not in known))


def data_params(cfg: QuickstartConfig) -> dict:
    used, dropped = synthetic_overrides(cfg)
    return {"image_size": cfg.image_size, "num_train": cfg.num_train, "num_val": cfg.num_val, "seed": cfg.seed,
            "difficulty": cfg.difficulty, "synthetic": used, "synthetic_unsupported": dropped}


# ------------------------------------------------------------------------------- 1. data
def stage_data(cfg: QuickstartConfig) -> Path:
    """Generates the synthetic set unless OUT/data/.complete says it is there with these parameters."""
    from proscale.data import generate_synthetic

    root = data_root(cfg)
    stamp = root / ".complete"
    params = data_params(cfg)
    if _read_json(stamp) == params:
        _say(f"[1/6] data: {root} exists ({cfg.num_train} train / {cfg.num_val} val, "
             f"{cfg.image_size}x{cfg.image_size}), kept")
        return root
    if params["synthetic_unsupported"]:
        logger.warning("the synthetic data generator has no %s: generated without (the task gets harder)",
                       ", ".join(params["synthetic_unsupported"]))
        _say(f"warning: proscale.data.generate_synthetic does not know {params['synthetic_unsupported']}; "
             "generating without them")
    _say(f"[1/6] data: generating {cfg.num_train} train + {cfg.num_val} val images "
         f"({cfg.image_size}x{cfg.image_size}, seed {cfg.seed}) in {root}")
    stamp.unlink(missing_ok=True)
    # generate_synthetic has no progress hook: a thread counts the images it has written.
    total = cfg.num_train + cfg.num_val
    done = threading.Event()

    def watch(bar):
        while not done.wait(0.3):
            n = sum(len(os.listdir(root / s)) if (root / s).is_dir() else 0 for s in ("train", "val"))
            bar.update(min(n, total) - bar.n)

    with _bar(cfg, total=total, desc="data", unit="img") as bar:
        watcher = threading.Thread(target=watch, args=(bar,), daemon=True)
        watcher.start()
        try:
            generate_synthetic(str(root), num_train=cfg.num_train, num_val=cfg.num_val, image_size=cfg.image_size,
                               seed=cfg.seed, difficulty=cfg.difficulty, **params["synthetic"])
        finally:
            done.set()
            watcher.join()
        bar.update(total - bar.n)
    _write_json(stamp, params)
    return root


# ---------------------------------------------------------------------------- 2. training
def train_config(cfg: QuickstartConfig, key: str, preset: str, iterations: int):
    """The engine's TrainConfig of one model (identical for both except the preset)."""
    from proscale.engine.train import TrainConfig, split_overrides

    tcfg = TrainConfig(preset=preset, output_dir=str(run_dir(cfg, key)), progress=cfg.progress)
    spec = f"synthetic:{data_root(cfg).resolve()}"
    tcfg.data.train = (spec,)
    tcfg.data.val = ""  # evaluated by the quickstart's own stage, once
    points = max(64, int(cfg.points_fraction * cfg.image_size * cfg.image_size))
    split_overrides(tcfg, [
        f"iterations={iterations}", f"batch_size={cfg.batch_size}", f"seed={cfg.seed}", f"device={cfg.device}",
        "eval_period=0", f"checkpoint_period={cfg.checkpoint_period}", "keep_last=1",
        f"log_period={max(1, min(10, iterations // 20))}",
        "data.augmentation=none", "data.flip=true", "data.min_size_test=0", "data.num_workers=0",
        f"solver.lr={cfg.lr}", f"solver.schedule={cfg.schedule}", f"solver.warmup_iters={cfg.warmup_iters}",
        f"solver.weight_decay={cfg.weight_decay}", "solver.backbone_multiplier=1.0",
        f"solver.clip_grad={cfg.clip_grad}", f"stop_after={cfg.stop_after}",
        f"loss.num_points={points}", f"loss.class_weight={cfg.class_weight}",
        f"loss.no_object_weight={cfg.no_object_weight}",
        f"test.object_mask_threshold={cfg.object_mask_threshold}",
        f"test.overlap_threshold={cfg.overlap_threshold}",
        "test.semantic_on=true",
        *cfg.extra_overrides,
    ])
    return tcfg


def time_training_step(cfg: QuickstartConfig, preset: str, steps: int = 5, warmup: int = 2) -> float:
    """Seconds per training iteration of `preset` here: the fastest of `steps` iterations after
    `warmup`, each loading its batch from disk, with the data, model, loss and optimizer of the
    real run."""
    from proscale.data import build_dataloader
    from proscale.engine.optim import build_optimizer, clip_and_norm
    from proscale.engine.train import build_model_config, build_train_dataset
    from proscale.models.criterion import build_criterion
    from proscale.models.maskformer import build_maskformer

    tcfg = train_config(cfg, "timing", preset, cfg.max_iterations)
    device = _device(cfg.device)
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
        images = [im.to(device) for im in batch["images"]]
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


def stage_plan(cfg: QuickstartConfig, started: float) -> dict:
    """OUT/plan.json: iterations per model (both the same), and the run's identity `id` (data,
    training settings, iterations) that every later stage's results are stamped with. Kept when
    it exists for the same data and settings (a re-run does not re-time)."""
    path = Path(cfg.out) / "plan.json"
    plan = _read_json(path)
    same = plan and plan.get("data") == data_params(cfg) and plan.get("training") == training_settings(cfg)
    if same and (not cfg.iterations or plan["iterations"] == cfg.iterations):
        _say(f"[2/6] plan: {plan['iterations']} iterations per model (from {path})")
        return plan
    if cfg.iterations > 0:
        plan = {"iterations": cfg.iterations, "reason": "--iterations"}
    else:
        _say("[2/6] plan: timing a few training steps of each model to fit the budget ...")
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
        plan = {"iterations": iterations, "reason": reason, "seconds_per_iteration": sec,
                "budget_minutes": cfg.budget_minutes}
    plan.update(batch_size=cfg.batch_size, data=data_params(cfg), training=training_settings(cfg))
    identity = json.dumps([plan["data"], plan["training"], plan["iterations"]], sort_keys=True)
    plan["id"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
    _write_json(path, plan)
    _say(f"[2/6] plan: {plan['iterations']} iterations per model, batch {cfg.batch_size} ({plan['reason']})")
    return plan


RUN_FILES = ("last_checkpoint", "metrics.jsonl", "done.json", "train_time.json", "quickstart_run.json")


def _clear_run(run: Path) -> None:
    """Removes a run's checkpoints and logs (they belong to another plan)."""
    for p in run.glob("model_*.pt"):
        p.unlink()
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)


def _finished(run: Path, plan: dict) -> int | None:
    """The iteration a completed training of this plan stopped at (OUT/runs/<model>/done.json,
    written after model_final.pt), or None when there is none."""
    stamp = _read_json(run / "done.json")
    if stamp and stamp.get("plan_id") == plan["id"] and (run / "model_final.pt").is_file():
        return int(stamp.get("iteration", -1))
    return None


def stage_train(cfg: QuickstartConfig, plan: dict) -> dict[str, dict]:
    from proscale.engine.train import train

    results = {}
    for n, (key, name, preset) in enumerate(MODELS):
        run = run_dir(cfg, key)
        done = _finished(run, plan)
        if done == plan["iterations"]:
            _say(f"[3/6] train {name}: {run}/model_final.pt at iteration {done}, kept")
            results[key] = {"status": "kept", "iteration": done}
            continue
        owner = _read_json(run / "quickstart_run.json")
        if run.is_dir() and (owner or {}).get("plan_id") != plan["id"]:
            _clear_run(run)  # checkpoints of other data or settings: the engine must not resume them
        _write_json(run / "quickstart_run.json", {"plan_id": plan["id"]})
        _say(f"[3/6] train {name} ({preset}), {plan['iterations']} iterations -> {run}")
        tcfg = train_config(cfg, key, preset, plan["iterations"])
        start = time.perf_counter()
        result = train(tcfg, resume=True)
        result["seconds"] = time.perf_counter() - start
        # Seconds of each call that trained (a resumed run adds up its parts).
        timing = _read_json(run / "train_time.json") or []
        timing.append(result["seconds"])
        _write_json(run / "train_time.json", timing)
        if result["status"] != "completed":
            raise RuntimeError(f"training {name} stopped ({result['status']}) at iteration {result['iteration']}; "
                               f"run the quickstart again to continue")
        _write_json(run / "done.json", {"iteration": result["iteration"], "seconds": sum(timing),
                                        "plan_id": plan["id"]})
        results[key] = {"status": "trained", "iteration": result["iteration"], "seconds": result["seconds"]}
    return results


# ---------------------------------------------------------------------------- 3. evaluation
def load_trained(cfg: QuickstartConfig, key: str):
    """(model in eval mode, predictor info) from OUT/runs/<key>/model_final.pt."""
    from proscale.predictor import load_model

    model, info = load_model(run_dir(cfg, key) / "model_final.pt", _device(cfg.device))
    return model, info


def val_dataset(cfg: QuickstartConfig):
    from proscale.data import build_dataset

    return build_dataset(f"synthetic:{data_root(cfg).resolve()}", "val")


def stage_eval(cfg: QuickstartConfig, plan: dict) -> dict[str, dict]:
    from proscale.data import build_dataloader
    from proscale.engine.evaluate import evaluate

    results = {}
    dataset = None
    for key, name, _ in MODELS:
        path = Path(cfg.out) / "eval" / f"{key}.json"
        stored = _read_json(path)
        if stored and stored.get("plan_id") == plan["id"]:
            _say(f"[4/6] evaluate {name}: {path} exists, kept")
            results[key] = stored
            continue
        dataset = dataset or val_dataset(cfg)
        model, info = load_trained(cfg, key)
        loader = build_dataloader(dataset, min(8, len(dataset)), train=False, num_workers=0)
        _say(f"[4/6] evaluate {name} on {len(dataset)} val images")
        with _bar(cfg, total=len(loader), desc=f"eval {key}", unit="batch") as bar:
            def batches():
                for batch in loader:
                    yield batch
                    bar.update(1)

            metrics = evaluate(model, batches(), dataset.metadata, ("panoptic", "instance", "semantic"),
                               info["inference"], device=_device(cfg.device))
        stored = {"plan_id": plan["id"], "iteration": plan["iterations"],
                  "inference": dataclasses.asdict(info["inference"]),
                  "metrics": metrics}
        _write_json(path, stored)
        results[key] = stored
    return results


# --------------------------------------------------------------------------- 4. measurement
def stage_measure(cfg: QuickstartConfig, plan: dict) -> dict:
    """GFLOPs per component and latency of both trained models, in this one process.

    At the training size (the table's numbers) and, when `latency_large_size` is set, at a larger
    input too: at 64 px there are only 84 tokens and fixed per-layer costs hide the savings that
    PRO-SCALE's FLOPs promise; a larger input shows where they go."""
    from proscale.analysis.benchmark import component_fns, time_fn
    from proscale.analysis.flops import count_flops

    path = Path(cfg.out) / "measure.json"
    stored = _read_json(path)
    settings = {"warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "rounds": cfg.latency_rounds,
                "larger": cfg.latency_large_size, "device": cfg.device, "threads": cfg.threads}
    if stored and stored.get("plan_id") == plan["id"] and stored.get("settings") == settings:
        _say(f"[5/6] measure: {path} exists, kept")
        return stored
    device = _device(cfg.device)
    sizes = [cfg.image_size] + ([cfg.latency_large_size] if cfg.latency_large_size > cfg.image_size else [])
    models = {key: load_trained(cfg, key)[0] for key, _, _ in MODELS}
    rows = ("pixel_decoder/infer", "model/infer")
    _say(f"[5/6] measure: GFLOPs and latency at {', '.join(f'{s}x{s}' for s in sizes)}, batch 1, {device}, "
         f"{torch.get_num_threads()} threads ({cfg.latency_rounds} interleaved rounds x {cfg.latency_repeats} runs)")
    load_before = _loadavg()
    results = []
    total = cfg.latency_rounds * len(rows) * len(models) * len(sizes)
    with _bar(cfg, total=total, desc="measure", unit="set") as bar:
        for n, side in enumerate(sizes):
            size = (side, side)
            flops = {}
            for key, name, _ in MODELS:
                report = count_flops(models[key], size, batch=1, name=name)
                flops[key] = {"gflops": report.gflops, "padded_size": list(report.padded_size),
                              "unsupported": report.unsupported, "layers": report.layers}
            torch.manual_seed(cfg.seed)
            images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, device=device).float()
            fns = {key: component_fns(models[key], images, torch.float32, device) for key in models}
            # The larger size is an outlook: fewer runs keep it to a few seconds.
            repeats = cfg.latency_repeats if n == 0 else max(2, cfg.latency_repeats // 2)
            samples: dict[str, dict[str, list[float]]] = {r: {k: [] for k in models} for r in rows}
            for _ in range(cfg.latency_rounds):
                for row in rows:
                    for key in models:
                        samples[row][key].extend(_times(fns[key][row], device, cfg.latency_warmup, repeats, time_fn))
                        bar.update(1)
            latency = {row: {k: _summary(v) for k, v in per.items()} for row, per in samples.items()}
            results.append({"size": list(size), "flops": flops, "latency_ms": latency})
            del fns
    stored = {"plan_id": plan["id"], "settings": settings, "iteration": plan["iterations"],
              "device": _device_name(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": _loadavg(),
              **results[0], "larger": results[1:]}
    _write_json(path, stored)
    return stored


def _times(fn, device, warmup, repeats, time_fn) -> list[float]:
    """All `repeats` single-run times (ms) of fn; time_fn with repeats=1 per run keeps its sync rules."""
    for _ in range(warmup):
        fn()
    return [time_fn(fn, device, 0, 1).median_ms for _ in range(repeats)]


def _summary(times: list[float]) -> dict:
    t = sorted(times)
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]  # noqa: E731
    mid = len(t) // 2
    median = t[mid] if len(t) % 2 else 0.5 * (t[mid - 1] + t[mid])
    return {"median": median, "p10": q(0.1), "p90": q(0.9), "runs": len(t)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------- the job
def auto_threads(device: torch.device) -> int | None:
    """CPU threads for this run: one per core that other work leaves idle right now (at least 1,
    at most torch's default); None (torch's default) on a GPU. On an oversubscribed CPU torch's
    OpenMP threads wait for one another: a training step measured 20x slower with 2 threads on 2
    cores while another job ran, and 1 thread avoids that."""
    if device.type != "cpu":
        return None
    default = torch.get_num_threads()
    idle = _idle_cores()
    if idle is None:
        return default
    return max(1, min(default, int(idle + 0.5)))


def _idle_cores(seconds: float = 0.5) -> float | None:
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
    load = _loadavg()
    return None if not load else cores - load[0]


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Runs (or resumes) every stage; returns {"report_md", "report_html", "table", ...}."""
    from proscale import report as report_mod

    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = cfg.threads if cfg.threads > 0 else auto_threads(_device(cfg.device))
    if threads:
        torch.set_num_threads(threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "quickstart_config.json", dataclasses.asdict(cfg))
    timings = _read_json(out / "stage_times.json") or {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return result

    timed("data", stage_data, cfg)
    plan = timed("plan", stage_plan, cfg, started)
    trained = timed("train", stage_train, cfg, plan)
    evals = timed("evaluate", stage_eval, cfg, plan)
    measure = timed("measure", stage_measure, cfg, plan)
    result = timed("report", report_mod.write_report, cfg, plan, evals, measure)
    _say(f"[6/6] report: {result['report_md']} " + ("exists for these results, kept" if result["status"] == "kept"
                                                     else "written (with plots and overlays)"))
    elapsed = time.perf_counter() - started
    timings["last_run_total"] = elapsed
    _write_json(out / "stage_times.json", timings)
    result.update(trained=trained, seconds=elapsed)
    return result


# ----------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quickstart", help="built-in data: train Mask2Former and PRO-SCALE, evaluate, "
                                                 "measure, write a report", description=__doc__.split("\n\n")[0],
                              epilog="Stages: data, plan, train, evaluate, measure, report; a re-run with the "
                                     "same --out resumes.")
    d = QuickstartConfig()
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                   help=f"time for the whole job; lowers the iterations when needed (default {d.budget_minutes:g})")
    p.add_argument("--iterations", type=int, default=0, help="iterations per model (skips the budget timing)")
    p.add_argument("--device", default=d.device, help="auto (a GPU when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: one per core that other work leaves idle)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    cfg = QuickstartConfig(out=args.out, budget_minutes=args.budget_minutes, iterations=args.iterations,
                           device=args.device, threads=args.threads, seed=args.seed, progress=not args.no_progress)
    result = run_quickstart(cfg)
    print()
    print(result["table"])
    print()
    print(f"report: {result['report_md']}")
    print(f"        {result['report_html']}")
    took = result["seconds"]
    print(f"quickstart took {took / 60:.1f} min" if took >= 60 else f"quickstart took {took:.0f} s")
    return 0
