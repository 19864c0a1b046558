"""`proscale quickstart` end to end at toy size: data -> both trainings -> evaluation -> GFLOPs and
latency -> report.md / report.html with plots and overlays; an interrupted run resumes from its
checkpoint and a finished one is left alone on a re-run."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.quickstart import MODELS, QuickstartConfig, add_parser, run_quickstart  # noqa: E402
from proscale.quickstart.train_config import train_config  # noqa: E402


def toy(out: Path, **kw) -> QuickstartConfig:
    """The smallest run that exercises every stage (seconds, not minutes)."""
    base = dict(out=str(out), image_size=64, num_train=8, num_val=3, iterations=3, batch_size=2, checkpoint_period=1,
                latency_warmup=1, latency_repeats=2, latency_rounds=1, latency_large_size=96, num_overlays=2,
                progress=False)
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
        run = out / "runs" / key
        files += [run / "model_final.pt", run / "metrics.jsonl", run / "done.json", out / "eval" / f"{key}.json"]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_quickstart_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "qs"
    # 1) The first model's training is cut after 2 of 3 iterations (as by a kill): the job stops.
    with pytest.raises(RuntimeError, match="run the quickstart again"):
        run_quickstart(toy(out, stop_after=2))
    first = out / "runs" / MODELS[0][0]
    assert (first / "model_0000002.pt").is_file() and not (first / "model_final.pt").exists()

    # 2) The re-run keeps the data, resumes that training at iteration 2 and does the rest.
    result = run_quickstart(toy(out))
    assert result["trained"][MODELS[0][0]]["status"] == "trained"
    iterations = [json.loads(line)["iteration"] for line in (first / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
    assert iterations == [1, 2, 3]  # continued, not restarted
    assert len(json.loads((first / "train_time.json").read_text())) == 2  # two calls trained it
    assert "resumed from" in (first / "log.txt").read_text()

    # Report files, plots and overlays.
    md = Path(result["report_md"]).read_text()
    html = Path(result["report_html"]).read_text()
    for _, name, preset in MODELS:
        assert name in md and name in result["table"] and preset in md
        assert name in html
    assert f"{MODELS[1][1]} / {MODELS[0][1]}" in result["table"]  # the ratio row
    for head in ("encoder GFLOPs", "total GFLOPs", "encoder ms", "model ms", "PQ", "AP", "mIoU"):
        assert head in md.splitlines()[md.splitlines().index("## Comparison") + 4]
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

    # Numbers: both models measured, PRO-SCALE's pixel decoder cheaper.
    measure = json.loads((out / "measure.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {k for k, _, _ in MODELS}
    base, ours = rows[MODELS[0][0]], rows[MODELS[1][0]]
    assert ours["encoder_gflops"] < 0.55 * base["encoder_gflops"]
    assert 0 < ours["total_gflops"] < base["total_gflops"]
    for row in ("pixel_decoder/infer", "model/infer"):
        assert all(measure["latency_ms"][row][k]["median"] > 0 for k in rows)
    for key in rows:
        metrics = json.loads((out / "eval" / f"{key}.json").read_text())["metrics"]
        assert {"panoptic", "instance", "semantic"} <= set(metrics)
        assert {"PQ", "PQ_th", "PQ_st"} <= set(metrics["panoptic"])

    # 3) A re-run with the same folder trains, evaluates and measures nothing again.
    before = snapshot(out)
    again = run_quickstart(toy(out))
    assert snapshot(out) == before
    assert all(t["status"] == "kept" for t in again["trained"].values())
    assert again["table"] == result["table"]
    assert "kept" in capsys.readouterr().err

    # 4) Other data: new data, both models retrained from scratch (old checkpoints are not resumed).
    other = run_quickstart(toy(out, num_train=6))
    assert all(t["status"] == "trained" for t in other["trained"].values())
    assert json.loads((out / "data" / ".complete").read_text())["num_train"] == 6
    lines = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss" in r] == [1, 2, 3]
    assert len(json.loads((first / "train_time.json").read_text())) == 1


def test_quickstart_cli_options():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart", "--out", "x", "--budget-minutes", "3", "--iterations", "7"])
    assert (args.out, args.budget_minutes, args.iterations) == ("x", 3.0, 7) and callable(args.func)


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    import proscale.quickstart.plan as plan

    default = torch.get_num_threads()
    monkeypatch.setattr(plan, "idle_cores", lambda: 0.2)  # another job holds the CPU
    assert plan.auto_threads(torch.device("cpu")) == 1
    monkeypatch.setattr(plan, "idle_cores", lambda: 64.0)  # idle: torch's default, never more
    assert plan.auto_threads(torch.device("cpu")) == default
    assert plan.auto_threads(torch.device("cuda")) is None


def test_train_config_carries_the_quickstart_settings(tmp_path):
    out = tmp_path / "qs"
    cfg = toy(out, lr=1e-3, warmup_iters=7, stop_after=2,
              extra_overrides=("solver.amp=false", "encoder.plan=2,2,2"))
    tcfg = train_config(cfg, "proscale", "proscale_nano_333", 40)
    assert (tcfg.preset, tcfg.output_dir) == ("proscale_nano_333", str(out / "runs" / "proscale"))
    assert (tcfg.iterations, tcfg.batch_size, tcfg.stop_after, tcfg.log_period, tcfg.eval_period) == (40, 2, 2, 2, 0)
    assert tcfg.data.train == (f"synthetic:{(out / 'data').resolve()}",) and tcfg.data.val == ""
    assert (tcfg.data.augmentation, tcfg.data.flip, tcfg.data.min_size_test) == ("none", True, 0)
    assert (tcfg.solver.lr, tcfg.solver.warmup_iters, tcfg.solver.schedule) == (1e-3, 7, "poly")
    assert tcfg.solver.backbone_multiplier == 1.0 and tcfg.solver.clip_grad == cfg.clip_grad
    assert tcfg.loss.num_points == int(cfg.points_fraction * 64 * 64)
    assert tcfg.test.semantic_on and tcfg.test.object_mask_threshold == cfg.object_mask_threshold
    # The user's key=value items: a TrainConfig key set in place, a model key kept for the model.
    assert tcfg.solver.amp is False and tcfg.model_overrides == ("encoder.plan=2,2,2",)
    # Both models get the same config but for the preset and the folder.
    other = train_config(cfg, "m2f", "m2f_nano", 40)
    assert dataclasses.replace(other, preset=tcfg.preset, output_dir=tcfg.output_dir) == tcfg
    with pytest.raises(KeyError):  # a typo fails here, not after the data are loaded
        train_config(toy(out, extra_overrides=("encoder.no_such_key=1",)), "m2f", "m2f_nano", 40)
