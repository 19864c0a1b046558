"""Upgrading a trained Mask2Former to PRO-SCALE: warm start (+ distillation) vs training from scratch.

On the quickstart's data and recipe (proscale.recipes.SmallRecipe: 800 iterations) and for each
seed:
    m2f            Mask2Former (m2f_nano), 800 iterations from scratch: the model a team already has
    scratch        PRO-SCALE (3,3,1) conv (proscale_nano_331_conv), 800 iterations from scratch
    scratch-1/4    the same, 200 iterations (what the upgrade's budget buys without the warm start)
    warm           PRO-SCALE, `--init` from that seed's m2f, 200 iterations (1/4 of the schedule);
                   encoder layers mapped with init_layer_map=first (the default)
    warm-depth     ... with init_layer_map=depth
    warm+distill   ... as warm, and `loss.distill_from` the same m2f (pixel-decoder feature distillation)
Every run is single-threaded and seeded: the numbers do not depend on the machine's load. The
m2f and scratch runs are the quickstart's own (OUT/runs/{m2f,proscale}/seed<k>): after
`proscale quickstart --out OUT` (with as many --seeds) they are kept, not retrained.

    python benchmarks/upgrade.py --out runs/quickstart --seeds 3      # writes OUT/upgrade.md, .json

The table in docs/upgrade.md was made by this command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from proscale.engine.train import split_overrides
from proscale.fileio import atomic_write, write_json
from proscale.quickstart.config import QuickstartConfig, data_spec, run_dir
from proscale.quickstart.console import say
from proscale.quickstart.stages import jobs as quickstart_jobs
from proscale.quickstart.stages import stage_data
from proscale.tradeoff.runs import Job, run_jobs
from proscale.tradeoff.summary import Stat

STUDENT = "proscale_nano_331_conv"
# name -> (TrainConfig overrides, uses the m2f checkpoint as --init, as teacher)
UPGRADES = {
    "scratch-1/4": ((), False, False),
    "warm": ((), True, False),
    "warm-depth": (("init_layer_map=depth",), True, False),
    "warm+distill": ((), True, True),
}
METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")


def upgrade_jobs(cfg: QuickstartConfig, fraction: float) -> list[Job]:
    stamp = json.dumps({"quickstart_data": str(data_spec(cfg))})
    out = []
    for seed in cfg.seed_list:
        teacher = str((run_dir(cfg, "m2f", seed) / "model_final.pt").resolve())
        for name, (overrides, init, distill) in UPGRADES.items():
            tcfg = cfg.recipe.train_config(preset=STUDENT, data=data_spec(cfg),
                                           output_dir=str(Path(cfg.out) / "upgrade" / name.replace("/", "_") / f"seed{seed}"),
                                           seed=seed)
            tcfg.iterations = int(cfg.recipe.iterations * fraction)
            tcfg.init = teacher if init else ""
            if distill:
                tcfg.loss.distill_from = teacher
            out.append(Job(name, seed, split_overrides(tcfg, list(overrides)), data_spec(cfg), data_stamp=stamp))
    return out


def table(results: dict[str, list[dict]], iterations: dict[str, int]) -> str:
    base = {r["seed"]: r["metrics"] for r in results["m2f"]}
    lines = ["| run | iterations | " + " | ".join(METRICS) + " | PQ - m2f (same seed) | train min (mean) |",
             "|---|---:|" + "---:|" * (len(METRICS) + 2)]
    for name, runs in results.items():
        stats = [Stat([r["metrics"][m] for r in runs if m in r.get("metrics", {})]) for m in METRICS]
        gap = Stat([r["metrics"]["PQ"] - base[r["seed"]]["PQ"] for r in runs])
        gap_text = "" if name == "m2f" else f"{gap.mean:+.1f} ± {gap.sem:.1f} (se)"
        minutes = Stat([r.get("train_seconds", 0.0) / 60 for r in runs]).mean
        lines.append(f"| {name} | {iterations[name]} | " + " | ".join(s.text() for s in stats)
                     + f" | {gap_text} | {minutes:.1f} |")
    return "\n".join(lines)


def findings(results: dict[str, list[dict]], iterations: dict[str, int], tolerance: float = 1.0) -> list[str]:
    """What the table says, computed from it: which runs reach the target (mean PQ within
    `tolerance` of the same seeds' Mask2Former), the best upgrade, and the training time it takes."""
    base = {r["seed"]: r["metrics"]["PQ"] for r in results["m2f"]}
    gaps = {name: Stat([r["metrics"]["PQ"] - base[r["seed"]] for r in runs])
            for name, runs in results.items() if name != "m2f"}
    minutes = {name: Stat([r.get("train_seconds", 0.0) / 60 for r in runs]).mean for name, runs in results.items()}
    short = [n for n in gaps if iterations[n] < iterations["m2f"]]
    met = [n for n in short if gaps[n].mean >= -tolerance]
    lines = [f"Target (PQ within {tolerance:g} of Mask2Former after {iterations[short[0]] if short else '-'} of its "
             f"{iterations['m2f']} iterations): " + (f"met by {', '.join(met)}" if met else "met by none")
             + (f"; not by {', '.join(n for n in short if n not in met)}" if len(met) < len(short) else "") + "."]
    lines.append(f"PRO-SCALE from scratch for the full schedule: PQ {gaps['scratch'].mean:+.1f} ± "
                 f"{gaps['scratch'].sem:.1f} (se), {minutes['scratch']:.1f} training minutes; " + "; ".join(
                     f"{n}: {gaps[n].mean:+.1f} ± {gaps[n].sem:.1f}, {minutes[n]:.1f} minutes" for n in short)
                 + " (minutes: wall-clock on this machine, which vary with its load; the PQ values do not).")
    warm = [n for n in short if n.startswith("warm")]
    if warm:
        best = max(warm, key=lambda n: (gaps[n].mean, -gaps[n].std))
        lines.append(f"Best upgrade: {best} ({gaps[best].mean:+.1f} PQ, spread over seeds {gaps[best].std:.1f}).")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart", help="the quickstart's output folder (data, runs)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.25, help="upgrade iterations / the recipe's")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    cfg = QuickstartConfig(out=args.out, seeds=args.seeds, workers=args.workers)
    stage_data(cfg)
    base = quickstart_jobs(cfg)  # m2f and PRO-SCALE from scratch: the quickstart's runs
    base_results = run_jobs(base, cfg.workers, say=say)
    ups = upgrade_jobs(cfg, args.fraction)
    up_results = run_jobs(ups, cfg.workers, say=say)
    results: dict[str, list[dict]] = {"m2f": [], "scratch": []}
    iterations = {"m2f": cfg.recipe.iterations, "scratch": cfg.recipe.iterations}
    for job, r in zip(base, base_results):
        results["m2f" if job.variant == "m2f" else "scratch"].append(r)
    for job, r in zip(ups, up_results):
        results.setdefault(job.variant, []).append(r)
        iterations[job.variant] = job.cfg.iterations
    text = table(results, iterations) + "\n\n" + "\n".join(f"- {line}" for line in findings(results, iterations))
    command = "python benchmarks/upgrade.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (f"# Upgrading a trained Mask2Former to PRO-SCALE\n\n`{command}`\n\n"
              f"{len(cfg.seed_list)} seeds ({cfg.seed_list}); mean ± std over seeds; PQ gap to the same "
              f"seed's Mask2Former with its standard error. Student: {STUDENT}.\n\n{text}\n")
    atomic_write(Path(cfg.out) / "upgrade.md", report)
    write_json(Path(cfg.out) / "upgrade.json", {k: v for k, v in results.items()})
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
