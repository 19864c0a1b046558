"""run_quickstart: every stage in order (resuming what OUT already holds), and the `proscale
quickstart` command that runs it and prints the comparison table."""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from proscale.distributed import resolve_device
from proscale.fileio import read_json, write_json
from proscale.quickstart.config import QuickstartConfig
from proscale.quickstart.console import say
from proscale.quickstart.plan import auto_threads, stage_plan
from proscale.quickstart.report import write_report
from proscale.quickstart.stages import stage_data, stage_eval, stage_measure, stage_train

DESCRIPTION = "`proscale quickstart`: Mask2Former vs PRO-SCALE on built-in data, end to end, no download."


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Runs (or resumes) every stage; returns write_report's summary ({"report_md", "report_html",
    "table", "rows", ...}) with "trained" (per model: "trained" or "kept") and "seconds" added.
    OUT/stage_times.json adds up the seconds each stage took over all runs."""
    started = time.perf_counter()
    threads = cfg.threads if cfg.threads > 0 else auto_threads(resolve_device(cfg.device))
    if threads:
        torch.set_num_threads(threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "quickstart_config.json", dataclasses.asdict(cfg))
    timings = read_json(out / "stage_times.json") or {}

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
    result = timed("report", write_report, cfg, plan, evals, measure)
    say(f"[6/6] report: {result['report_md']} " + ("exists for these results, kept" if result["status"] == "kept"
                                                    else "written (with plots and overlays)"))
    elapsed = time.perf_counter() - started
    timings["last_run_total"] = elapsed
    write_json(out / "stage_times.json", timings)
    result.update(trained=trained, seconds=elapsed)
    return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("quickstart", help="built-in data: train Mask2Former and PRO-SCALE, evaluate, "
                                                 "measure, write a report", description=DESCRIPTION,
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
