"""`proscale tradeoff`: which PRO-SCALE setting to ship for your data.

Trains and evaluates a set of encoder variants (tradeoff/variants.py) on your data, each with k
seeds, and writes a table and a plot of pixel-decoder GFLOPs (and measured latency) against PQ,
mask AP and mIoU with the seed spread and the Pareto front, a recommendation, and what each
option changes, all computed from the runs:

    proscale tradeoff --data coco-panoptic:/data/mine --val-data coco-panoptic:/data/mine \\
        --preset m2f_nano --size 128 --seeds 3 --out runs/tradeoff [--variants default] [key=value ...]

The training recipe is `small` (proscale/recipes/small.yaml: the CPU-sized presets trained from
scratch), changed by `key=value` items as `proscale train` takes them (iterations=600,
solver.lr=1e-3, ...); every variant and seed gets the same one. Runs go one per core, each
single-threaded (tradeoff/runs.py), and a re-run with the same --out keeps finished runs and
resumes interrupted ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from proscale.fileio import read_json, write_json
from proscale.recipes import SmallRecipe
from proscale.tradeoff.runs import Job, data_stamp, run_jobs
from proscale.tradeoff.summary import build_rows
from proscale.tradeoff.variants import Variant, parse_variants


@dataclass
class TradeoffConfig:
    data: str  # training data spec
    val_data: str  # validation data spec (the val split is evaluated)
    out: str = "runs/tradeoff"
    preset: str = "m2f_nano"  # the base model: every variant changes only its encoder
    variants: str = "default"  # comma-separated keys (tradeoff/variants.py)
    seeds: int = 3
    size: int = 128  # training image size (the images are trained at their own size) and the FLOP size
    recipe: SmallRecipe = field(default_factory=SmallRecipe)
    overrides: tuple[str, ...] = ()  # further TrainConfig / model key=value items
    workers: int = 0  # processes (0: one per core)
    latency: bool = True  # time each variant's pixel decoder (one thread, interleaved rounds)
    tolerance: float = 1.0  # PQ a recommended variant may trail the baseline by
    progress: bool = True


def build_jobs(cfg: TradeoffConfig, variants: list[Variant]) -> list[Job]:
    from proscale.engine.train import split_overrides

    jobs, stamp = [], data_stamp(cfg.data, cfg.val_data)
    for v in variants:
        for seed in range(cfg.seeds):
            tcfg = cfg.recipe.train_config(preset=cfg.preset, data=cfg.data,
                                           output_dir=str(Path(cfg.out) / "runs" / v.key / f"seed{seed}"),
                                           seed=seed, model_overrides=v.overrides)
            jobs.append(Job(v.key, seed, split_overrides(tcfg, list(cfg.overrides)), cfg.val_data, data_stamp=stamp))
    return jobs


def _model(cfg: TradeoffConfig, job: Job, num_classes: int):
    from proscale.engine.train import build_model_config
    from proscale.models.maskformer import build_maskformer

    return build_maskformer(build_model_config(job.cfg, num_classes)).eval()


def measure_costs(cfg: TradeoffConfig, variants: list[Variant], jobs: list[Job]) -> tuple[dict, dict]:
    """({variant: {component: GFLOPs}}, {variant: {"pixel_decoder_ms": median}}) at cfg.size."""
    import torch

    from proscale.analysis.benchmark import component_fns, time_fn
    from proscale.analysis.flops import count_flops
    from proscale.data import build_dataset

    num_classes = build_dataset(cfg.val_data, "val").metadata.num_classes
    first = {v.key: next(j for j in jobs if j.variant == v.key) for v in variants}
    models = {k: _model(cfg, job, num_classes) for k, job in first.items()}
    gflops = {k: {c: count_flops(m, (cfg.size, cfg.size)).gflops[c] for c in ("pixel_decoder", "total")}
              for k, m in models.items()}
    latency: dict[str, dict] = {}
    if cfg.latency:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            images = torch.rand(1, 3, cfg.size, cfg.size) * 255
            fns = {k: component_fns(m, images, torch.float32, torch.device("cpu"))["pixel_decoder/infer"]
                   for k, m in models.items()}
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(3):  # interleaved rounds: a burst of load hits every variant alike
                for k, fn in fns.items():
                    times[k].append(time_fn(fn, torch.device("cpu"), 2, 10).median_ms)
            latency = {k: {"pixel_decoder_ms": sorted(t)[len(t) // 2]} for k, t in times.items()}
        finally:
            torch.set_num_threads(threads)
    return gflops, latency


def run_tradeoff(cfg: TradeoffConfig, say=print) -> dict:
    """Runs (or resumes) everything; returns {"rows", "recommendation", "report_md", ...}."""
    from proscale.tradeoff.report import write_report

    variants = parse_variants(cfg.variants)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tradeoff_config.json", dataclasses.asdict(cfg))
    jobs = build_jobs(cfg, variants)
    say(f"tradeoff: {len(variants)} variants x {cfg.seeds} seeds on {cfg.data} ({cfg.preset}, {cfg.size} px, "
        f"{jobs[0].cfg.iterations} iterations each) -> {out}")
    results = run_jobs(jobs, cfg.workers, cfg.progress, say=say)
    unfinished = [r for r in results if "metrics" not in r]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} runs did not finish ({unfinished[0]['status']}); run the same command "
                           f"again to continue")
    costs = read_json(out / "costs.json")
    if not costs or costs.get("variants") != [v.key for v in variants] or costs.get("size") != cfg.size:
        say("measuring GFLOPs" + (" and pixel-decoder latency" if cfg.latency else "") + " of every variant")
        gflops, latency = measure_costs(cfg, variants, jobs)
        costs = {"variants": [v.key for v in variants], "size": cfg.size, "gflops": gflops, "latency": latency}
        write_json(out / "costs.json", costs)
    rows = build_rows(variants, results, costs["gflops"], costs["latency"])
    return write_report(cfg, rows, results)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tradeoff", help="train and evaluate encoder variants x seeds on your data: "
                                               "GFLOPs vs accuracy, Pareto front, recommendation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TradeoffConfig(data="", val_data="")
    p.add_argument("--data", required=True, metavar="SPEC", help="training data, e.g. coco-panoptic:/data/mine")
    p.add_argument("--val-data", metavar="SPEC", help="validation data (default: --data, its val split)")
    p.add_argument("--out", default=d.out)
    p.add_argument("--preset", default=d.preset, help=f"base model (default {d.preset})")
    p.add_argument("--variants", default=d.variants,
                   help="comma-separated: default, m2f, p333, p222-conv, p111-notrc, p333-t1, p333-res, p204 ...")
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--size", type=int, default=d.size, help="training image size in pixels (square)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="PQ the recommendation may trail by")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe changes as `proscale train` takes them: iterations=600, solver.lr=1e-3, ...")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    recipe_keys = {f.name for f in dataclasses.fields(SmallRecipe)}
    recipe_items = {k: v for k, v in (o.split("=", 1) for o in args.overrides if "=" in o) if k in recipe_keys}
    recipe = SmallRecipe()
    for key, text in recipe_items.items():  # iterations=, batch_size= address the recipe itself
        setattr(recipe, key, int(text))  # every SmallRecipe field is a count
    rest = tuple(o for o in args.overrides if o.split("=", 1)[0] not in recipe_items)
    cfg = TradeoffConfig(data=args.data, val_data=args.val_data or args.data, out=args.out, preset=args.preset,
                         variants=args.variants, seeds=args.seeds, size=args.size, recipe=recipe, overrides=rest,
                         workers=args.workers, latency=not args.no_latency, tolerance=args.tolerance,
                         progress=not args.no_progress)
    result = run_tradeoff(cfg)
    print()
    print(result["table"])
    print()
    print(f"recommended: {result['recommendation']['name']} ({result['recommendation']['reason']})")
    print(f"report: {result['report_md']}\n        {result['report_html']}")
    return 0 if not math.isnan(result["rows"][0].mean("PQ")) else 1
