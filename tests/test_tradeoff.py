"""`proscale tradeoff` at toy size, and its parts: variant keys, statistics over seeds, the Pareto
front, the recommendation and the explanations generated from the table."""
from __future__ import annotations

import json
import math

import pytest

from proscale.tradeoff.summary import Row, Stat, gap_explanations, mark_pareto, recommend
from proscale.tradeoff.variants import DEFAULT_KEYS, parse_variant, parse_variants, with_option


def test_variant_keys_spell_the_encoder():
    v = parse_variant("p333-notrc-conv")  # any order: one canonical key
    assert v.key == "p333-conv-notrc" and v.plan == (3, 3, 3)
    assert "encoder.output=conv" in v.overrides and "encoder.trc=false" in v.overrides
    t = parse_variant("p204-t1-res")
    assert t.key == "p204-res-t1" and "encoder.trc_temperature=1.0" in t.overrides and "encoder.residual=true" in t.overrides
    assert parse_variant("m2f").overrides[0] == "encoder.plan=0,0,6"
    assert with_option("p333", "-conv") == "p333-conv" and with_option("p333-t1", "-notrc") == "p333-notrc-t1"
    assert [v.key for v in parse_variants("p111,default")][:2] == ["m2f", "p111"]  # baseline first, no repeats
    assert len(parse_variants("default")) == len(DEFAULT_KEYS) == 13
    for bad in ("p33", "p330", "q333", "p333-fast", "p333-conv-conv"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_stat_and_pareto_and_recommendation():
    s = Stat([90.0, 92.0, 94.0])
    assert (s.mean, s.std, s.n) == (92.0, 2.0, 3) and s.sem == pytest.approx(2 / math.sqrt(3))
    rows = [Row("m2f", "base", {"pixel_decoder": 1.0}, {"PQ": Stat([92.0, 92.0])}),
            Row("p333", "half", {"pixel_decoder": 0.5}, {"PQ": Stat([91.5, 91.1])}),
            Row("p333-conv", "conv", {"pixel_decoder": 0.7}, {"PQ": Stat([91.0, 91.0])}),  # dominated by p333
            Row("p111", "quarter", {"pixel_decoder": 0.2}, {"PQ": Stat([88.0, 88.2])})]
    mark_pareto(rows)
    assert [r.pareto for r in rows] == [True, True, False, True]
    rec = recommend(rows, tolerance=1.0)
    assert rec["key"] == "p333" and "0.50x" in rec["reason"]  # p111 is cheaper but 3.9 PQ behind
    assert recommend(rows, tolerance=5.0)["key"] == "p111"
    assert recommend(rows, tolerance=0.1)["key"] == "p333" and "comes closest" in recommend(rows, 0.1)["reason"]
    lines = gap_explanations(rows)
    assert "half: -0.7 PQ against base" in lines[0]
    assert any(line.startswith("the 3x3 conv instead of LPE, from half: -0.3 PQ (91.3 -> 91.0)") for line in lines)


def test_tradeoff_end_to_end(tmp_path):
    from proscale.data import generate_synthetic
    from proscale.recipes import SmallRecipe
    from proscale.tradeoff import TradeoffConfig, run_tradeoff

    root = generate_synthetic(str(tmp_path / "data"), num_train=6, num_val=3, image_size=64, seed=0)
    cfg = TradeoffConfig(data=f"synthetic:{root}", val_data=f"synthetic:{root}", out=str(tmp_path / "out"),
                         variants="m2f,p333,p333-conv", seeds=2, size=64, workers=2, progress=False,
                         recipe=SmallRecipe(iterations=2, batch_size=2, checkpoint_period=1))
    result = run_tradeoff(cfg, say=lambda m: None)
    rows = {r.key: r for r in result["rows"]}
    assert list(rows) == ["m2f", "p333", "p333-conv"]
    assert all(r.metrics["PQ"].n == 2 for r in rows.values())
    assert rows["p333"].gflops["pixel_decoder"] < 0.55 * rows["m2f"].gflops["pixel_decoder"]
    assert rows["p333"].gflops["pixel_decoder"] < rows["p333-conv"].gflops["pixel_decoder"]
    assert all(r.latency_ms["pixel_decoder_ms"] > 0 for r in rows.values())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["key"] for r in summary["rows"]] == list(rows) and summary["recommendation"]["key"] in rows
    md = (tmp_path / "out" / "tradeoff.md").read_text()
    assert "Recommended:" in md and "![accuracy vs cost](tradeoff.png)" in md and "| Mask2Former |" in md
    assert (tmp_path / "out" / "tradeoff.html").read_text().count("data:image/png;base64,") == 1
    # A re-run keeps every finished run (nothing retrained).
    stamp = (tmp_path / "out" / "runs" / "p333" / "seed1" / "result.json").stat().st_mtime_ns
    again = run_tradeoff(cfg, say=lambda m: None)
    assert (tmp_path / "out" / "runs" / "p333" / "seed1" / "result.json").stat().st_mtime_ns == stamp
    assert again["table"] == result["table"]


def test_workers_stop_when_the_command_is_killed(tmp_path):
    """kill -9 of `proscale tradeoff` must not leave its training processes running: each saves a
    checkpoint and stops (a re-run resumes from it), and none starts a queued job."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from proscale.data import generate_synthetic

    root = generate_synthetic(str(tmp_path / "data"), num_train=4, num_val=2, image_size=64, seed=0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "proscale", "tradeoff", "--data", f"synthetic:{root}", "--out", str(out),
           "--variants", "m2f,p111", "--seeds", "1", "--size", "64", "--workers", "1", "--no-progress",
           "--no-latency", "iterations=100000", "batch_size=2", "checkpoint_period=100000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "runs" / "m2f" / "seed0"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (run / "metrics.jsonl").is_file(), "training did not start"
        worker = json.loads((run / ".lock").read_text())["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the training process outlived its command")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(run.glob("model_0*.pt")), "no checkpoint saved on the way out"
    assert not (out / "runs" / "p111").exists()  # the queued job never started
