"""`proscale quickstart` end to end at toy size: data -> both models x 2 seeds trained and evaluated
(one single-threaded process per core) -> GFLOPs and latency -> report.md / report.html with
plots, overlays and the seed spread; an interrupted run resumes from its checkpoint, a finished
one is left alone on a re-run, and the numbers do not depend on the number of processes."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.quickstart import MODELS, QuickstartConfig, add_parser, run_quickstart  # noqa: E402
from proscale.quickstart.config import run_dir  # noqa: E402
from proscale.quickstart.stages import jobs  # noqa: E402
from proscale.recipes import SmallRecipe  # noqa: E402


def toy(out: Path, **kw) -> QuickstartConfig:
    """The smallest run that exercises every stage (seconds, not minutes)."""
    base = dict(out=str(out), image_size=64, num_train=8, num_val=3, seeds=2, workers=2,
                recipe=SmallRecipe(iterations=3, batch_size=2, checkpoint_period=1), latency_warmup=1,
                latency_repeats=2, latency_rounds=1, latency_large_size=96, num_overlays=2, progress=False)
    base.update(kw)
    return QuickstartConfig(**base)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def snapshot(out: Path) -> dict[str, int]:
    """mtime_ns of what a finished run must not rewrite on a re-run."""
    files = [out / "data" / ".complete", out / "data" / "annotations" / "panoptic_train.json", out / "plan.json",
             out / "measure.json", out / "report.md", out / "report.html", out / "plots" / "loss_curves.png"]
    for key, _, _ in MODELS:
        for seed in (0, 1):
            run = out / "runs" / key / f"seed{seed}"
            files += [run / "model_final.pt", run / "metrics.jsonl", run / "result.json"]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def iterations_logged(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in lines if "loss" in r]


def test_quickstart_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "qs"
    # 1) Every training is cut after 2 of 3 iterations (as by a kill): the job stops.
    with pytest.raises(RuntimeError, match="run the quickstart again"):
        run_quickstart(toy(out, stop_after=2))
    first = out / "runs" / MODELS[0][0] / "seed0"
    assert (first / "model_0000002.pt").is_file() and not (first / "model_final.pt").exists()

    # 2) The re-run keeps the data, resumes the trainings at iteration 2 and does the rest.
    result = run_quickstart(toy(out))
    assert all(s == "completed" for statuses in result["trained"].values() for s in statuses)
    assert iterations_logged(first) == [1, 2, 3]  # continued, not restarted
    assert "resumed from" in (first / "log.txt").read_text()

    # Report files, plots and overlays.
    md = Path(result["report_md"]).read_text()
    html = Path(result["report_html"]).read_text()
    for _, name, preset in MODELS:
        assert name in md and name in result["table"] and preset in md
        assert name in html
    assert f"{MODELS[1][1]} / {MODELS[0][1]}" in result["table"]  # the ratio row
    lines = md.splitlines()
    for head in ("encoder GFLOPs", "total GFLOPs", "encoder ms", "model ms", "PQ", "AP", "mIoU"):
        assert head in lines[lines.index("## Comparison") + 4]
    assert "mean ± sample standard deviation over 2 trainings per model (seeds 0, 1" in md
    assert "object-mask threshold 0.5" in md  # the inference thresholds are stated
    # The paper's cuts are quoted as the paper's, our own R50 count as ours.
    assert "The paper reports -52% encoder and -27% total GFLOPs" in md
    assert "our own count of those two models at 800x1088" in md and "gives -49.9% and -28.0%" in md
    assert html.count("data:image/png;base64,") == 3  # loss curves, GFLOPs bars, overlays: embedded
    for plot in ("loss_curves.png", "gflops_per_component.png"):
        w, h = png_size(out / "plots" / plot)
        assert w > 300 and h > 200
    overlays = sorted((out / "overlays").glob("val_*.png"))
    assert len(overlays) == 2
    w, h = png_size(overlays[0])
    assert w > 4 * 64 * 3 and h >= 64 * 3  # four upscaled panels side by side: input, GT, two models
    assert (out / "overlays" / "overview.png").is_file()

    # Numbers: both models x both seeds evaluated; each seed's line in the report; the table's
    # means are the seeds' means; PRO-SCALE's pixel decoder cheaper.
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {k for k, _, _ in MODELS}
    for key, name, _ in MODELS:
        results = [json.loads((run_dir(toy(out), key, s) / "result.json").read_text()) for s in (0, 1)]
        assert all({"PQ", "PQ_th", "PQ_st", "AP", "mIoU"} <= set(r["metrics"]) for r in results)
        assert rows[key]["PQ"].values == [r["metrics"]["PQ"] for r in results]
        for r, seed in zip(results, (0, 1)):
            assert f"| {name} | {seed} | {r['metrics']['PQ']:.1f} |" in md
    base, ours = rows[MODELS[0][0]], rows[MODELS[1][0]]
    assert ours["encoder_gflops"] < 0.55 * base["encoder_gflops"]
    assert 0 < ours["total_gflops"] < base["total_gflops"]
    measure = json.loads((out / "measure.json").read_text())
    for row in ("pixel_decoder/infer", "model/infer"):
        assert all(measure["latency_ms"][row][k]["median"] > 0 for k in rows)

    # 3) A re-run with the same folder trains, evaluates and measures nothing again.
    before = snapshot(out)
    again = run_quickstart(toy(out))
    assert snapshot(out) == before
    assert all(s == "kept" for statuses in again["trained"].values() for s in statuses)
    assert again["table"] == result["table"]
    assert "kept" in capsys.readouterr().err

    # 4) Other data: new data, every run retrained from scratch (old checkpoints are not resumed).
    other = run_quickstart(toy(out, num_train=6, seeds=1))
    assert all(s == "completed" for statuses in other["trained"].values() for s in statuses)
    assert json.loads((out / "data" / ".complete").read_text())["num_train"] == 6
    assert iterations_logged(first) == [1, 2, 3]
    assert "resumed from" not in (first / "log.txt").read_text().split("--resume: no checkpoint")[-1]


def test_numbers_do_not_depend_on_the_number_of_processes(tmp_path):
    """Each run is single-threaded and seeded: one process or two give the same weights' metrics."""
    one = run_quickstart(toy(tmp_path / "one", workers=1, seeds=1, latency_large_size=0))
    two = run_quickstart(toy(tmp_path / "two", workers=2, seeds=1, latency_large_size=0))
    for a, b in zip(one["rows"], two["rows"]):
        assert a["PQ"].values == b["PQ"].values and a["AP"].values == b["AP"].values
        assert a["mIoU"].values == b["mIoU"].values


def test_quickstart_cli_options():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart", "--out", "x", "--budget-minutes", "3", "--iterations", "7",
                              "--seeds", "3"])
    assert (args.out, args.budget_minutes, args.iterations, args.seeds) == ("x", 3.0, 7, 3) and callable(args.func)


def test_jobs_carry_the_recipe(tmp_path):
    out = tmp_path / "qs"
    cfg = toy(out, recipe=SmallRecipe(iterations=40, batch_size=2), stop_after=2,
              extra_overrides=("solver.amp=false", "encoder.plan=2,2,2", "solver.lr=1e-3"))
    runs = jobs(cfg)
    assert [(j.variant, j.seed) for j in runs] == [(k, s) for k, _, _ in MODELS for s in (0, 1)]
    tcfg = runs[-1].cfg
    assert (tcfg.preset, tcfg.output_dir) == (MODELS[-1][2], str(out / "runs" / MODELS[-1][0] / "seed1"))
    assert (tcfg.iterations, tcfg.batch_size, tcfg.stop_after, tcfg.log_period, tcfg.eval_period) == (40, 2, 2, 2, 0)
    assert tcfg.data.train == (f"synthetic:{(out / 'data').resolve()}",) and tcfg.data.val == ""
    assert (tcfg.data.augmentation, tcfg.data.flip, tcfg.data.min_size_test) == ("none", True, 0)
    # The small recipe (proscale/recipes/small.yaml), with the user's solver.lr.
    assert tcfg.recipe == "small" and (tcfg.solver.lr, tcfg.solver.warmup_iters, tcfg.solver.schedule) == (1e-3, 50, "poly")
    assert tcfg.solver.backbone_multiplier == 1.0 and tcfg.solver.clip_grad == 1.0
    assert (tcfg.loss.num_points, tcfg.loss.points_fraction) == (0, 0.25)  # derived from the images when it starts
    assert tcfg.test.semantic_on and tcfg.test.object_mask_threshold == 0.5
    # The user's key=value items: a TrainConfig key set in place, a model key kept for the model.
    assert tcfg.solver.amp is False and tcfg.model_overrides == ("encoder.plan=2,2,2",)
    # Every run gets the same config but for the preset, the seed and the folder.
    other = runs[0].cfg
    assert dataclasses.replace(other, preset=tcfg.preset, output_dir=tcfg.output_dir, seed=1) == tcfg
    with pytest.raises(KeyError):  # a typo fails here, not after the data are loaded
        jobs(toy(out, extra_overrides=("encoder.no_such_key=1",)))
