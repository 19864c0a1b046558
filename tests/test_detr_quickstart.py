"""`proscale quickstart --task detection` end to end at toy size: data, both detectors trained
and evaluated (box AP), GFLOPs and latency, the report with loss curves and box overlays."""
from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.quickstart.config import DET_MODELS  # noqa: E402
from proscale.quickstart.detection import detection_config, run_detection_quickstart  # noqa: E402
from proscale.quickstart.job import add_parser  # noqa: E402
from proscale.quickstart.stages import jobs  # noqa: E402
from proscale.recipes import DetectionRecipe  # noqa: E402


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_detection_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qsd"
    cfg = detection_config(out=str(out), image_size=64, num_train=8, num_val=3, workers=1,
                           recipe=DetectionRecipe(iterations=3, batch_size=2, checkpoint_period=1), latency_warmup=1,
                           latency_repeats=2, latency_rounds=1, latency_large_size=96, num_overlays=2, progress=False)
    result = run_detection_quickstart(cfg)
    md = (out / "report.md").read_text()
    assert "| model | encoder GFLOPs | total GFLOPs | encoder ms | model ms | box AP | AP50 | AP75 |" in md
    for _, name, preset in DET_MODELS:
        assert f"{name} (`{preset}`)" in md
        assert (out / "runs" / DET_MODELS[0][0] / "seed0" / "result.json").is_file()
    assert "Target (PRO-SCALE's box AP within 2 points" in result["goal"]
    stored = json.loads((out / "runs" / "proscale" / "seed0" / "result.json").read_text())
    assert set(stored["metrics"]) == {"box_AP", "box_AP50", "box_AP75"}
    measure = json.loads((out / "measure.json").read_text())
    assert set(measure["latency_ms"]) == {"encoder/infer", "model/infer"}
    g = {k: measure["flops"][k]["gflops"] for k, _, _ in DET_MODELS}
    assert 0.3 < g["proscale"]["encoder"] / g["ddetr"]["encoder"] < 0.6  # (2,2,2,2) vs (0,0,0,6)
    assert measure["larger"][0]["size"] == [96, 96]
    overlays = [Path(p) for p in result["overlays"]]
    assert len(overlays) == 3 and overlays[-1].name == "overview.png"
    w, h = png_size(overlays[0])
    assert w > 4 * 128 and h > 128  # input, ground truth and two detectors, upscaled to ~256 px
    assert png_size(out / "plots" / "loss_curves.png")[0] > 0
    assert "<img" in (out / "report.html").read_text()
    assert result["trained"] == {"ddetr": ["completed"], "proscale": ["completed"]}
    # A second run keeps the trained runs and their box AP.
    again = run_detection_quickstart(cfg)
    assert again["trained"] == {"ddetr": ["kept"], "proscale": ["kept"]}
    assert [r["box_AP"].values for r in again["rows"]] == [r["box_AP"].values for r in result["rows"]]


def test_detection_jobs_and_cli():
    cfg = detection_config(out="x")
    runs = jobs(cfg, DET_MODELS)
    assert [(j.variant, j.seed) for j in runs] == [("ddetr", 0), ("proscale", 0)]
    assert runs[1].cfg.preset == "proscale_ddetr_nano_2222"
    assert (runs[0].cfg.solver.lr, runs[0].cfg.solver.clip_grad) == (1e-3, 0.1)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart", "--task", "detection", "--iterations", "5"])
    assert (args.task, args.out, args.seeds, args.iterations) == ("detection", None, None, 5)
