"""The detection quickstart's report: OUT/report.md + report.html, the loss curves and box
overlays (input | ground-truth boxes | each detector's boxes) of a few val images."""
from __future__ import annotations

import datetime
import math
from pathlib import Path


from proscale.fileio import atomic_write
from proscale.models.detr.targets import mask_boxes
from proscale.predictor import Predictor
from proscale.quickstart.config import DET_MODELS, QuickstartConfig, run_dir, val_dataset
from proscale.quickstart.figures import overlay_rows, plot_loss_curves, titled
from proscale.quickstart.tables import difference, fmt, ratio
from proscale.report_html import markdown_table, markdown_to_html, text_table
from proscale.tradeoff.summary import Stat
from proscale.visualize import draw_boxes

METRICS = ("box_AP", "box_AP50", "box_AP75")
HEAD = ["model", "encoder GFLOPs", "total GFLOPs", "encoder ms", "model ms", "box AP", "AP50", "AP75"]
TARGET_AP_GAP = 2.0  # the goal: PRO-SCALE's box AP within 2 points of Deformable DETR's
SCORE_THRESHOLD = 0.3  # boxes drawn in the overlays


def rows_of(evals: dict, measure: dict) -> list[dict]:
    rows = []
    for key, name, preset in DET_MODELS:
        g, lat = measure["flops"][key]["gflops"], measure["latency_ms"]
        runs = [r for r in evals.get(key, []) if r.get("metrics")]
        rows.append({"key": key, "name": name, "preset": preset, "encoder_gflops": g["encoder"],
                     "total_gflops": g["total"], "encoder_ms": lat["encoder/infer"][key]["median"],
                     "model_ms": lat["model/infer"][key]["median"], "seeds": [r["seed"] for r in runs],
                     **{m: Stat([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in METRICS}})
    return rows


def cells(rows: list[dict]) -> list[list[str]]:
    lines = [[f"{r['name']} (`{r['preset']}`)", fmt(r["encoder_gflops"], 3), fmt(r["total_gflops"], 3),
              fmt(r["encoder_ms"], 2), fmt(r["model_ms"], 2)] + [r[m].text() for m in METRICS] for r in rows]
    a, b = rows
    lines.append(["ratio / difference"] + [ratio(a[k], b[k]) for k in ("encoder_gflops", "total_gflops",
                                                                         "encoder_ms", "model_ms")]
                 + [difference(a[m], b[m]) for m in METRICS])
    return lines


def goal(rows: list[dict]) -> str:
    a, b = rows[0]["box_AP"], rows[1]["box_AP"]
    if not (a.n and b.n) or math.isnan(a.mean) or math.isnan(b.mean):
        return "box AP: not available (a run has no evaluation)"
    gap = b.mean - a.mean
    met = "met" if gap >= -TARGET_AP_GAP else "NOT met"
    return (f"Target (PRO-SCALE's box AP within {TARGET_AP_GAP:g} points of Deformable DETR's): {met}, "
            f"{gap:+.1f} points ({b.mean:.1f} vs {a.mean:.1f}, means over {b.n} and {a.n} seed(s)).")


def write_overlays(cfg: QuickstartConfig, out_dir: Path, count: int) -> list[Path]:
    """Rows of input | ground-truth boxes (thing instances) | each detector's boxes above
    SCORE_THRESHOLD, upscaled to about 256 px; the stacked overview last."""
    dataset = val_dataset(cfg)
    md = dataset.metadata
    things = set(md.thing_classes)
    predictors = {key: Predictor(run_dir(cfg, key) / "model_final.pt", device=cfg.device) for key, _, _ in DET_MODELS}

    def panels(sample, image, factor):
        keep = [i for i, label in enumerate(sample["labels"].tolist()) if label in things]
        gt = mask_boxes(sample["masks"][keep]) * factor
        out = [titled(draw_boxes(image, gt, sample["labels"][keep], None, md), "ground truth")]
        for key, name, _ in DET_MODELS:
            det = predictors[key].predict(sample["image"])["detections"]
            out.append(titled(draw_boxes(image, det["boxes"] * factor, det["labels"], det["scores"], md,
                                         SCORE_THRESHOLD), name))
        return out

    return overlay_rows(dataset, count, out_dir, panels)


def component_lines(measure: dict) -> str:
    keys = [("backbone", "backbone"), ("input_proj", "input projections"), ("extra_levels", "extra stride-64 level"),
            ("encoder", "encoder"), ("decoder", "decoder layers"), ("heads", "heads"), ("total", "total")]
    head = ["component"] + [n for _, n, _ in DET_MODELS] + ["ratio"]
    g = {k: measure["flops"][k]["gflops"] for k, _, _ in DET_MODELS}
    a, b = (k for k, _, _ in DET_MODELS)
    return markdown_table(head, [[label, fmt(g[a][c], 4), fmt(g[b][c], 4), ratio(g[a][c], g[b][c])] for c, label in keys])


def write_detection_report(cfg: QuickstartConfig, plan: dict, evals: dict, measure: dict) -> dict:
    out = Path(cfg.out)
    rows = rows_of(evals, measure)
    md_path, html_path, loss_png = out / "report.md", out / "report.html", out / "plots" / "loss_curves.png"
    plot_loss_curves({k: (f"{n} (seed {cfg.seed})", run_dir(cfg, k) / "metrics.jsonl") for k, n, _ in DET_MODELS},
                     loss_png, terms=("loss_focal", "loss_bbox", "loss_giou"))
    overlays = write_overlays(cfg, out / "overlays", cfg.num_overlays)
    images = {loss_png: "loss curves", **({overlays[-1]: "overlays"} if overlays else {})}
    load = measure.get("loadavg_before")
    r = cfg.recipe.train_config(preset=DET_MODELS[0][2], data="", output_dir="")  # the recipe as run
    md = ["# proscale quickstart: Deformable DETR vs PRO-SCALE on synthetic boxes\n",
          f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `proscale quickstart --task detection --out {cfg.out}`. "
          f"Device: {measure['device']}, {measure['threads']} thread(s)"
          + (f", load average {load[0]:.1f} when measured" if load else "") + ".\n",
          "## Comparison\n", markdown_table(HEAD, cells(rows)) + "\n",
          f"Box AP (COCO, pycocotools) on the {cfg.num_val} val images, mean ± std over seeds "
          f"{', '.join(map(str, cfg.seed_list))}; the last row: cost ratios, and differences of the means ± their "
          f"standard error. Latency: median of interleaved runs, batch 1, {cfg.image_size}x{cfg.image_size}; "
          "\"encoder\" is the input projections, the extra level and the encoder.\n",
          goal(rows) + "\n",
          "## GFLOPs per component\n", component_lines(measure) + "\n",
          "## Training\n",
          f"Both detectors: {r.iterations} iterations of batch {r.batch_size}, AdamW {r.solver.lr:g} ({r.solver.schedule}, "
          f"{r.solver.warmup_iters} warmup), gradient clipping {r.solver.clip_grad:g}, from scratch, images at their own size "
          f"with flips (the `{r.recipe}` recipe, proscale/recipes/{r.recipe}.yaml). Losses: sigmoid focal (2), L1 (5), GIoU (2) on every "
          "decoder layer.\n", f"![loss curves]({loss_png.relative_to(out).as_posix()})\n",
          "## Predictions on val images\n",
          f"Columns: input, ground-truth boxes, then each detector's boxes with score >= {SCORE_THRESHOLD:g} "
          f"(seed {cfg.seed}).\n"]
    if overlays:
        md.append(f"![overlays]({overlays[-1].relative_to(out).as_posix()})\n")
    md_text = "\n".join(md)
    atomic_write(md_path, md_text)
    atomic_write(html_path, markdown_to_html(md_text, out, images, title="proscale detection quickstart"))
    return {"report_md": str(md_path), "report_html": str(html_path), "table": text_table(HEAD, cells(rows)),
            "rows": rows, "goal": goal(rows), "overlays": [str(p) for p in overlays], "plots": [str(loss_png)]}
