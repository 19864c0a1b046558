"""The quickstart's working stages: 1 data, 3 train, 4 evaluate, 5 measure (2, the plan, is
proscale/quickstart/plan.py; 6, the report, proscale/quickstart/report.py).

Each stage first checks what OUT already holds for this plan (its `id`) and keeps it, so that a
re-run resumes instead of starting over.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import threading
import time
from pathlib import Path

import torch

from proscale.analysis.benchmark import component_fns, time_fn
from proscale.analysis.flops import count_flops
from proscale.data import build_dataloader, generate_synthetic
from proscale.distributed import resolve_device
from proscale.engine.evaluate import evaluate
from proscale.engine.train import train
from proscale.fileio import read_json, write_json
from proscale.predictor import PredictorSettings, load_for_inference
from proscale.quickstart.config import MODELS, QuickstartConfig, data_params, data_root, run_dir, val_dataset
from proscale.quickstart.console import progress_bar, say
from proscale.quickstart.plan import loadavg
from proscale.quickstart.train_config import train_config

logger = logging.getLogger("proscale.quickstart")


# ------------------------------------------------------------------------------- 1. data
def stage_data(cfg: QuickstartConfig) -> Path:
    """Generates the synthetic set unless OUT/data/.complete says it is there with these parameters."""
    root = data_root(cfg)
    stamp = root / ".complete"
    params = data_params(cfg)
    if read_json(stamp) == params:
        say(f"[1/6] data: {root} exists ({cfg.num_train} train / {cfg.num_val} val, "
            f"{cfg.image_size}x{cfg.image_size}), kept")
        return root
    if params["synthetic_unsupported"]:
        logger.warning("the synthetic data generator has no %s: generated without (the task gets harder)",
                       ", ".join(params["synthetic_unsupported"]))
        say(f"warning: proscale.data.generate_synthetic does not know {params['synthetic_unsupported']}; "
            "generating without them")
    say(f"[1/6] data: generating {cfg.num_train} train + {cfg.num_val} val images "
        f"({cfg.image_size}x{cfg.image_size}, seed {cfg.seed}) in {root}")
    stamp.unlink(missing_ok=True)
    # generate_synthetic has no progress hook: a thread counts the images it has written.
    total = cfg.num_train + cfg.num_val
    done = threading.Event()

    def watch(bar):
        while not done.wait(0.3):
            n = sum(len(os.listdir(root / s)) if (root / s).is_dir() else 0 for s in ("train", "val"))
            bar.update(min(n, total) - bar.n)

    with progress_bar(cfg, total=total, desc="data", unit="img") as bar:
        watcher = threading.Thread(target=watch, args=(bar,), daemon=True)
        watcher.start()
        try:
            generate_synthetic(str(root), num_train=cfg.num_train, num_val=cfg.num_val, image_size=cfg.image_size,
                               seed=cfg.seed, difficulty=cfg.difficulty, **params["synthetic"])
        finally:
            done.set()
            watcher.join()
        bar.update(total - bar.n)
    write_json(stamp, params)
    return root


# ------------------------------------------------------------------------------ 3. training
RUN_FILES = ("last_checkpoint", "metrics.jsonl", "done.json", "train_time.json", "quickstart_run.json")


def clear_run(run: Path) -> None:
    """Removes a run's checkpoints and logs (they belong to another plan)."""
    for p in run.glob("model_*.pt"):
        p.unlink()
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)


def finished_iteration(run: Path, plan: dict) -> int | None:
    """The iteration a completed training of this plan stopped at (OUT/runs/<model>/done.json,
    written after model_final.pt), or None when there is none."""
    stamp = read_json(run / "done.json")
    if stamp and stamp.get("plan_id") == plan["id"] and (run / "model_final.pt").is_file():
        return int(stamp.get("iteration", -1))
    return None


def stage_train(cfg: QuickstartConfig, plan: dict) -> dict[str, dict]:
    """Trains each model with proscale.engine.train into OUT/runs/<key>: an interrupted run
    continues from its newest checkpoint (the engine's resume); a finished one of this plan is
    kept; one of another plan is cleared first. Returns key -> {"status", "iteration", ...}."""
    results = {}
    for key, name, preset in MODELS:
        run = run_dir(cfg, key)
        done = finished_iteration(run, plan)
        if done == plan["iterations"]:
            say(f"[3/6] train {name}: {run}/model_final.pt at iteration {done}, kept")
            results[key] = {"status": "kept", "iteration": done}
            continue
        owner = read_json(run / "quickstart_run.json")
        if run.is_dir() and (owner or {}).get("plan_id") != plan["id"]:
            clear_run(run)  # checkpoints of other data or settings: the engine must not resume them
        write_json(run / "quickstart_run.json", {"plan_id": plan["id"]})
        say(f"[3/6] train {name} ({preset}), {plan['iterations']} iterations -> {run}")
        tcfg = train_config(cfg, key, preset, plan["iterations"])
        start = time.perf_counter()
        result = train(tcfg, resume=True)
        result["seconds"] = time.perf_counter() - start
        # Seconds of each call that trained (a resumed run adds up its parts).
        timing = read_json(run / "train_time.json") or []
        timing.append(result["seconds"])
        write_json(run / "train_time.json", timing)
        if result["status"] != "completed":
            raise RuntimeError(f"training {name} stopped ({result['status']}) at iteration {result['iteration']}; "
                               f"run the quickstart again to continue")
        write_json(run / "done.json", {"iteration": result["iteration"], "seconds": sum(timing),
                                       "plan_id": plan["id"]})
        results[key] = {"status": "trained", "iteration": result["iteration"], "seconds": result["seconds"]}
    return results


def load_trained(cfg: QuickstartConfig, key: str) -> tuple[torch.nn.Module, PredictorSettings]:
    """(model in eval mode, its inference settings) from OUT/runs/<key>/model_final.pt."""
    return load_for_inference(run_dir(cfg, key) / "model_final.pt", resolve_device(cfg.device))


# ---------------------------------------------------------------------------- 4. evaluation
def stage_eval(cfg: QuickstartConfig, plan: dict) -> dict[str, dict]:
    """OUT/eval/<key>.json per model: PQ (things / stuff), mask AP and mIoU on the val split,
    with the inference settings used. Returns key -> that JSON."""
    results = {}
    dataset = None
    for key, name, _ in MODELS:
        path = Path(cfg.out) / "eval" / f"{key}.json"
        stored = read_json(path)
        if stored and stored.get("plan_id") == plan["id"]:
            say(f"[4/6] evaluate {name}: {path} exists, kept")
            results[key] = stored
            continue
        dataset = dataset or val_dataset(cfg)
        model, info = load_trained(cfg, key)
        loader = build_dataloader(dataset, min(8, len(dataset)), train=False, num_workers=0)
        say(f"[4/6] evaluate {name} on {len(dataset)} val images")
        with progress_bar(cfg, total=len(loader), desc=f"eval {key}", unit="batch") as bar:
            def batches():
                for batch in loader:
                    yield batch
                    bar.update(1)

            metrics = evaluate(model, batches(), dataset.metadata, ("panoptic", "instance", "semantic"),
                               info.inference, device=resolve_device(cfg.device))
        stored = {"plan_id": plan["id"], "iteration": plan["iterations"],
                  "inference": dataclasses.asdict(info.inference),
                  "metrics": metrics}
        write_json(path, stored)
        results[key] = stored
    return results


# --------------------------------------------------------------------------- 5. measurement
def stage_measure(cfg: QuickstartConfig, plan: dict) -> dict:
    """OUT/measure.json: GFLOPs per component and latency of both trained models, in this one
    process.

    At the training size (the table's numbers) and, when `latency_large_size` is set, at a larger
    input too: at 64 px there are only 84 tokens and fixed per-layer costs hide the savings that
    PRO-SCALE's FLOPs promise; a larger input shows where they go."""
    path = Path(cfg.out) / "measure.json"
    stored = read_json(path)
    settings = {"warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "rounds": cfg.latency_rounds,
                "larger": cfg.latency_large_size, "device": cfg.device, "threads": cfg.threads}
    if stored and stored.get("plan_id") == plan["id"] and stored.get("settings") == settings:
        say(f"[5/6] measure: {path} exists, kept")
        return stored
    device = resolve_device(cfg.device)
    sizes = [cfg.image_size] + ([cfg.latency_large_size] if cfg.latency_large_size > cfg.image_size else [])
    models = {key: load_trained(cfg, key)[0] for key, _, _ in MODELS}
    rows = ("pixel_decoder/infer", "model/infer")
    say(f"[5/6] measure: GFLOPs and latency at {', '.join(f'{s}x{s}' for s in sizes)}, batch 1, {device}, "
        f"{torch.get_num_threads()} threads ({cfg.latency_rounds} interleaved rounds x {cfg.latency_repeats} runs)")
    load_before = loadavg()
    results = []
    total = cfg.latency_rounds * len(rows) * len(models) * len(sizes)
    with progress_bar(cfg, total=total, desc="measure", unit="set") as bar:
        for n, side in enumerate(sizes):
            size = (side, side)
            flops = {}
            for key, name, _ in MODELS:
                report = count_flops(models[key], size, batch=1, name=name)
                flops[key] = {"gflops": report.gflops, "padded_size": list(report.padded_size),
                              "unsupported": report.unsupported, "layers": report.layers}
            torch.manual_seed(cfg.seed)
            images = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, device=device).float()  # (1, 3, H, W)
            fns = {key: component_fns(models[key], images, torch.float32, device) for key in models}
            # The larger size is an outlook: fewer runs keep it to a few seconds.
            repeats = cfg.latency_repeats if n == 0 else max(2, cfg.latency_repeats // 2)
            samples: dict[str, dict[str, list[float]]] = {r: {k: [] for k in models} for r in rows}
            for _ in range(cfg.latency_rounds):
                for row in rows:
                    for key in models:
                        samples[row][key].extend(run_times(fns[key][row], device, cfg.latency_warmup, repeats))
                        bar.update(1)
            latency = {row: {k: spread(v) for k, v in per.items()} for row, per in samples.items()}
            results.append({"size": list(size), "flops": flops, "latency_ms": latency})
            del fns
    stored = {"plan_id": plan["id"], "settings": settings, "iteration": plan["iterations"],
              "device": device_name(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": loadavg(),
              **results[0], "larger": results[1:]}
    write_json(path, stored)
    return stored


def run_times(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """All `repeats` single-run times (ms) of fn; time_fn with repeats=1 per run keeps its sync rules."""
    for _ in range(warmup):
        fn()
    return [time_fn(fn, device, 0, 1).median_ms for _ in range(repeats)]


def spread(times: list[float]) -> dict:
    """{"median", "p10", "p90", "runs"} of run times (p10 / p90: the nearest-rank percentiles)."""
    t = sorted(times)
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]  # noqa: E731
    mid = len(t) // 2
    median = t[mid] if len(t) % 2 else 0.5 * (t[mid - 1] + t[mid])
    return {"median": median, "p10": q(0.1), "p90": q(0.9), "runs": len(t)}


def device_name(device: torch.device) -> str:
    """The GPU's name, or "cpu (<model name>, <n> cores)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores)"
