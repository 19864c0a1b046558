"""`proscale quickstart --task detection`: Deformable DETR vs PRO-SCALE on the same built-in
data, end to end (the synthetic set's thing instances are the objects; boxes are their tight
boxes). The stages are the segmentation quickstart's (config.py, plan.py, stages.py) with the
detector presets, box AP, the detector's FLOP counter and latency rows, and its own report
(detection_report.py).

    proscale quickstart --task detection [--out runs/quickstart_detection] [--seeds 1]
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from proscale.analysis.benchmark import detector_fns
from proscale.analysis.detr_flops import count_detr_flops
from proscale.distributed import resolve_device
from proscale.fileio import write_json
from proscale.predictor import load_for_inference
from proscale.quickstart.config import DET_MODELS, QuickstartConfig, run_dir
from proscale.quickstart.console import progress_bar, say
from proscale.quickstart.detection_report import write_detection_report
from proscale.quickstart.plan import expected_minutes, loadavg, stage_plan
from proscale.quickstart.stages import (device_name, one_thread_on_cpu, run_times, spread, stage_data, stage_train,
                                       stored_measure)
from proscale.recipes import DetectionRecipe

# Seconds per training iteration (128 px, batch 4, one thread, two trainings at once on the
# 2-core development CPU): an estimate for an idle machine, only for the expected duration. The
# detection quickstart measured 0.55 (PRO-SCALE) and 0.75 (Deformable DETR) at load average 4-6.
SECONDS_PER_ITERATION = 0.35
ROWS = ("encoder/infer", "model/infer")


def detection_config(**kw) -> QuickstartConfig:
    """The segmentation quickstart's data and settings with the detection recipe, one seed and
    its own output folder by default."""
    kw.setdefault("out", "runs/quickstart_detection")
    kw.setdefault("seeds", 1)
    kw.setdefault("recipe", DetectionRecipe())
    return QuickstartConfig(**kw)


def load_trained(cfg: QuickstartConfig, key: str):
    return load_for_inference(run_dir(cfg, key) / "model_final.pt", resolve_device(cfg.device))


def stage_measure(cfg: QuickstartConfig, plan: dict) -> dict:
    """OUT/measure.json: GFLOPs per component and latency (one thread on CPU, the models
    interleaved) of both trained detectors at the training size and `latency_large_size`."""
    path, settings, stored = stored_measure(cfg, plan)
    if stored:
        return stored
    device = resolve_device(cfg.device)
    with one_thread_on_cpu(device):
        models = {key: load_trained(cfg, key)[0] for key, _, _ in DET_MODELS}
        sizes = [cfg.image_size] + ([cfg.latency_large_size] if cfg.latency_large_size > cfg.image_size else [])
        say(f"[5/6] measure: GFLOPs and latency at {', '.join(f'{s}x{s}' for s in sizes)}, batch 1, {device}, "
            f"{torch.get_num_threads()} thread(s)")
        load_before, results = loadavg(), []
        with progress_bar(cfg, total=cfg.latency_rounds * len(ROWS) * len(models) * len(sizes), desc="measure",
                          unit="set") as bar:
            for n, side in enumerate(sizes):
                flops = {key: {"gflops": count_detr_flops(m, (side, side), name=key).gflops} for key, m in models.items()}
                torch.manual_seed(cfg.seed)
                images = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8, device=device).float()
                fns = {key: detector_fns(m, images, torch.float32, device) for key, m in models.items()}
                repeats = cfg.latency_repeats if n == 0 else max(2, cfg.latency_repeats // 2)
                samples = {r: {k: [] for k in models} for r in ROWS}
                for _ in range(cfg.latency_rounds):
                    for row in ROWS:
                        for key in models:
                            samples[row][key].extend(run_times(fns[key][row], device, cfg.latency_warmup, repeats))
                            bar.update(1)
                results.append({"size": [side, side], "flops": flops,
                                "latency_ms": {r: {k: spread(v) for k, v in per.items()} for r, per in samples.items()}})
        stored = {"plan_id": plan["id"], "settings": settings, "device": device_name(device),
                  "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                  "loadavg_after": loadavg(), **results[0], "larger": results[1:]}
        write_json(path, stored)
        return stored


def run_detection_quickstart(cfg: QuickstartConfig) -> dict:
    """Every stage in order, resuming what OUT holds; returns the report summary with "trained"
    (per model: its runs' statuses) and "seconds"."""
    from proscale.tradeoff.runs import default_workers

    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quickstart_config.json", {"task": "detection", **dataclasses.asdict(cfg)})
    workers = cfg.workers or default_workers()
    say(f"proscale quickstart --task detection -> {out}: about "
        f"{expected_minutes(cfg, workers, DET_MODELS, SECONDS_PER_ITERATION) + 1.5:.0f} min on an idle CPU of "
        f"{workers} cores like the development machine")
    stage_data(cfg)
    plan = stage_plan(cfg, DET_MODELS)
    evals = stage_train(cfg, plan, DET_MODELS)
    measure = stage_measure(cfg, plan)
    result = write_detection_report(cfg, plan, evals, measure)
    say(f"[6/6] report: {result['report_md']} written (with plots and overlays)")
    result["trained"] = {k: [r["status"] for r in runs] for k, runs in evals.items()}
    result["seconds"] = time.perf_counter() - started
    write_json(out / "stage_times.json", {"last_run_total": result["seconds"]})
    return result
