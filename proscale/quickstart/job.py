"""run_quickstart: every stage in order (resuming what OUT already holds), and the `proscale
quickstart` command that runs it and prints the comparison table."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from proscale.fileio import read_json, write_json
from proscale.quickstart.config import SETTINGS, QuickstartConfig, with_setting
from proscale.quickstart.console import say
from proscale.quickstart.plan import expected_minutes, stage_plan
from proscale.quickstart.report import write_report
from proscale.quickstart.stages import stage_data, stage_measure, stage_train
from proscale.tradeoff.runs import default_workers

DESCRIPTION = "`proscale quickstart`: Mask2Former vs PRO-SCALE on built-in data, end to end, no download."


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Runs (or resumes) every stage; returns write_report's summary ({"report_md", "report_html",
    "table", "rows", ...}) with "trained" (per model: its runs' statuses) and "seconds" added.
    OUT/stage_times.json adds up the seconds each stage took over all runs."""
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quickstart_config.json", dataclasses.asdict(cfg))
    timings = read_json(out / "stage_times.json") or {}
    workers = cfg.workers or default_workers()
    say(f"proscale quickstart -> {out}: about {expected_minutes(cfg, workers) + 1.5:.0f} min on an idle CPU of "
        f"{workers} cores like the development machine (budget {cfg.budget_minutes:g} min)")

    def timed(name, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return result

    timed("data", stage_data, cfg)
    plan = timed("plan", stage_plan, cfg)
    evals = timed("train", stage_train, cfg, plan)
    measure = timed("measure", stage_measure, cfg, plan)
    result = timed("report", write_report, cfg, plan, evals, measure)
    say(f"[6/6] report: {result['report_md']} " + ("exists for these results, kept" if result["status"] == "kept"
                                                    else "written (with plots and overlays)"))
    elapsed = time.perf_counter() - started
    if elapsed > cfg.budget_minutes * 60:
        say(f"note: the quickstart took {elapsed / 60:.1f} min, more than its {cfg.budget_minutes:g}-minute budget "
            "(a slower or busy machine); the numbers do not depend on it")
    timings["last_run_total"] = elapsed
    write_json(out / "stage_times.json", timings)
    result.update(trained={k: [r["status"] for r in runs] for k, runs in evals.items()}, seconds=elapsed)
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quickstart", help="built-in data: train Mask2Former and PRO-SCALE, evaluate, "
                                                 "measure, write a report", description=DESCRIPTION,
                              epilog="Stages: data, plan, train and evaluate, measure, report; a re-run with the "
                                     "same --out resumes.")
    d = QuickstartConfig()
    p.add_argument("--out", default=None, help=f"output folder (default {d.out})")
    p.add_argument("--task", choices=["segmentation", "detection"], default="segmentation",
                   help="segmentation: Mask2Former vs PRO-SCALE (the default); detection: Deformable DETR vs "
                        "PRO-SCALE on the same data (default --out runs/quickstart_detection, 1 seed)")
    p.add_argument("--seeds", type=int, default=None, help=f"trainings per model (default {d.seeds}; detection 1)")
    p.add_argument("--setting", default="default", choices=sorted(SETTINGS),
                   help="built-in data: default (128 px, colours follow the class) or hard (256 px, many small "
                        "instances, random colours)")
    p.add_argument("--iterations", type=int, default=0,
                   help=f"iterations per training (default: the recipe's {d.recipe.iterations})")
    p.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                   help="the time expected; a warning when this machine needs more (it never changes the recipe)")
    p.add_argument("--workers", type=int, default=0, help="training processes of one thread each (default: cores)")
    p.add_argument("--device", default=d.device, help="cpu, or cuda to measure latency on a GPU")
    p.add_argument("--seed", type=int, default=d.seed, help="the data's seed and the first training seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace, make) -> QuickstartConfig:
    """The command's QuickstartConfig: `make(**fields)` (QuickstartConfig, or detection_config for
    --task detection) with the flags given, then the --setting."""
    d = make()
    recipe = dataclasses.replace(d.recipe, iterations=args.iterations) if args.iterations > 0 else d.recipe
    return with_setting(make(out=args.out or d.out, seeds=args.seeds or d.seeds, budget_minutes=args.budget_minutes,
                             workers=args.workers, device=args.device, seed=args.seed, recipe=recipe,
                             progress=not args.no_progress), args.setting)


def main(args: argparse.Namespace) -> int:
    if args.task == "detection":
        return _main_detection(args)
    result = run_quickstart(config_from_args(args, QuickstartConfig))
    print()
    print(result["table"])
    print()
    print(f"report: {result['report_md']}")
    print(f"        {result['report_html']}")
    took = result["seconds"]
    print(f"quickstart took {took / 60:.1f} min" if took >= 60 else f"quickstart took {took:.0f} s")
    return 0


def _main_detection(args: argparse.Namespace) -> int:
    from proscale.quickstart.detection import detection_config, run_detection_quickstart

    result = run_detection_quickstart(config_from_args(args, detection_config))
    print()
    print(result["table"])
    print()
    print(result["goal"])
    print(f"report: {result['report_md']}")
    print(f"        {result['report_html']}")
    took = result["seconds"]
    print(f"quickstart took {took / 60:.1f} min" if took >= 60 else f"quickstart took {took:.0f} s")
    return 0
