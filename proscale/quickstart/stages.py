"""The quickstart's working stages: 1 data, 3 train and evaluate, 5 measure (2, the plan, is
proscale/quickstart/plan.py; 6, the report, proscale/quickstart/report.py).

Each stage first checks what OUT already holds for this plan (its `id`) and keeps it, so that a
re-run resumes instead of starting over.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from proscale.analysis.benchmark import component_fns, time_fn
from proscale.analysis.flops import count_flops
from proscale.data import generate_synthetic
from proscale.distributed import resolve_device
from proscale.engine.train import split_overrides
from proscale.fileio import read_json, write_json
from proscale.predictor import PredictorSettings, load_for_inference
from proscale.quickstart.config import MODELS, QuickstartConfig, data_params, data_root, data_spec, run_dir
from proscale.quickstart.console import progress_bar, say
from proscale.quickstart.plan import loadavg
from proscale.tradeoff.runs import Job, run_jobs

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


# --------------------------------------------------------------------- 3. training and evaluation
def jobs(cfg: QuickstartConfig, models=MODELS) -> list[Job]:
    """One engine training + evaluation per model and seed: the same recipe for all of them."""
    stamp = json.dumps(data_params(cfg), sort_keys=True)  # the generated data are a function of these
    out = []
    for key, _, preset in models:
        for seed in cfg.seed_list:
            tcfg = cfg.recipe.train_config(preset=preset, data=data_spec(cfg),
                                           output_dir=str(run_dir(cfg, key, seed)), seed=seed,
                                           stop_after=cfg.stop_after)
            out.append(Job(key, seed, split_overrides(tcfg, list(cfg.extra_overrides)), data_spec(cfg),
                           data_stamp=stamp))
    return out


def stage_train(cfg: QuickstartConfig, plan: dict, models=MODELS) -> dict[str, list[dict]]:
    """Trains and evaluates every (model, seed) run (proscale.tradeoff.runs: one single-threaded
    process per core; finished runs kept, interrupted ones resumed). Returns key -> the runs'
    results in seed order ({"seed", "status", "metrics", "train_seconds", ...})."""
    todo = jobs(cfg, models)
    budget = cfg.budget_minutes * 60
    results = run_jobs(todo, cfg.workers, cfg.progress, say=lambda m: say(f"[3/6] {m}"), budget_s=budget)
    stopped = [r for r in results if r["status"] not in ("completed", "kept")]
    if stopped:
        r = stopped[0]
        raise RuntimeError(f"training {r['variant']} seed {r['seed']} stopped ({r['status']}) at iteration "
                           f"{r['iteration']}; run the quickstart again to continue")
    by_key: dict[str, list[dict]] = {key: [] for key, _, _ in models}
    for job, result in zip(todo, results):
        by_key[job.variant].append(result)
    return by_key


def load_trained(cfg: QuickstartConfig, key: str) -> tuple[torch.nn.Module, PredictorSettings]:
    """(model in eval mode, its inference settings) of the first seed's run of model `key`."""
    return load_for_inference(run_dir(cfg, key) / "model_final.pt", resolve_device(cfg.device))


# --------------------------------------------------------------------------- 5. measurement
@contextlib.contextmanager
def one_thread_on_cpu(device: torch.device):
    """torch runs one thread inside (on CPU), as every training ran: latency then follows the work
    done, and a busy machine slows it in proportion instead of stalling threads that wait for each
    other. The thread count is restored after."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stored_measure(cfg: QuickstartConfig, plan: dict) -> tuple[Path, dict, dict | None]:
    """(OUT/measure.json, the latency settings, its content when it was measured for this plan
    with these settings, else None)."""
    path = Path(cfg.out) / "measure.json"
    settings = {"warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats, "rounds": cfg.latency_rounds,
                "larger": cfg.latency_large_size, "device": cfg.device}
    stored = read_json(path)
    if stored and stored.get("plan_id") == plan["id"] and stored.get("settings") == settings:
        say(f"[5/6] measure: {path} exists, kept")
        return path, settings, stored
    return path, settings, None


def stage_measure(cfg: QuickstartConfig, plan: dict) -> dict:
    """OUT/measure.json: GFLOPs per component and latency of both trained models, in this one
    process.

    At the training size (the table's numbers) and, when `latency_large_size` is set, at a larger
    input too: at 64 px there are only 84 tokens and fixed per-layer costs hide the savings that
    PRO-SCALE's FLOPs promise; a larger input shows where they go."""
    path, settings, stored = stored_measure(cfg, plan)
    if stored:
        return stored
    device = resolve_device(cfg.device)
    with one_thread_on_cpu(device):
        return measure(cfg, plan, device, path, settings)


def measure(cfg: QuickstartConfig, plan: dict, device: torch.device, path: Path, settings: dict) -> dict:
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
