"""Resume: a run stopped after k iterations and resumed to n ends with the weights of an
uninterrupted n-iteration run (data order, augmentation, optimizer, schedule, RNG all restored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.checkpoints.io import safe_load  # noqa: E402
from proscale.engine.train import TrainConfig, split_overrides, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 6
# 4 images, batch 2: an epoch is 2 iterations, so the runs cross epoch boundaries; random
# flips and resizes check that augmentation replays; the step schedule drops the lr at 3 and 5.
OVERRIDES = [f"iterations={N}", "batch_size=2", "log_period=1", "checkpoint_period=0", "eval_period=0",
             "data.augmentation=resize", "data.min_size_train=48,56,64", "data.max_size_train=64",
             "data.flip=true", "data.num_workers=0", "loss.num_points=512", "solver.schedule=step",
             "solver.steps=3,5", "solver.lr=1e-4", "seed=7"]


def make_cfg(root: str, out: Path, *extra: str) -> TrainConfig:
    """The config `proscale train --preset m2f_tiny ... OVERRIDES` runs: the preset's recipe + OVERRIDES."""
    from proscale.recipes import recipe_config

    cfg = recipe_config(None, "m2f_tiny")
    cfg.output_dir, cfg.progress = str(out), False
    cfg.data.train = (f"synthetic:{root}",)
    return split_overrides(cfg, OVERRIDES + list(extra))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from proscale.data import generate_synthetic

    return generate_synthetic(str(tmp_path_factory.mktemp("synth") / "s"), num_train=4, num_val=1,
                              image_size=64, seed=3)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """Weights of the uninterrupted N-iteration run."""
    out = tmp_path_factory.mktemp("ref")
    result = train(make_cfg(data_root, out))
    assert result["status"] == "completed" and result["iteration"] == N
    return safe_load(out / "model_final.pt")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert worst <= atol, f"max weight difference {worst:.3g}"


def iterations_logged(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in open(out / "metrics.jsonl") if "loss" in line]


def test_stop_and_resume_matches_uninterrupted(data_root, reference, tmp_path):
    out = tmp_path / "run"
    first = train(make_cfg(data_root, out, "stop_after=3"))
    assert first["status"] == "stopped" and first["iteration"] == 3
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pt"
    ckpt = safe_load(out / "model_0000003.pt")
    assert ckpt["iteration"] == 3 and ckpt["data"]["batches_per_rank"] == 3
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}
    assert ckpt["scheduler"]["last_epoch"] == 3

    second = train(make_cfg(data_root, out), resume=True)
    assert second["status"] == "completed" and second["iteration"] == N
    final = safe_load(out / "model_final.pt")
    assert_same_weights(final["model"], reference["model"])
    # The optimizer state continues too (Adam moments and step counts).
    for key, state in reference["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.allclose(final["optimizer"]["state"][key][name].double(), value.double(), atol=1e-6)
    assert iterations_logged(out) == list(range(1, N + 1))


def test_resume_without_checkpoint_starts_fresh(data_root, tmp_path):
    out = tmp_path / "run"
    result = train(make_cfg(data_root, out, "iterations=1"), resume=True)
    assert result["status"] == "completed" and result["iteration"] == 1


def test_sigterm_saves_and_resumes(data_root, reference, tmp_path):
    """`proscale train` stopped by SIGTERM mid-run exits 0 with a checkpoint; --resume finishes
    the run with the uninterrupted run's weights."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "proscale", "train", "--preset", "m2f_tiny", "--data", f"synthetic:{data_root}",
           "--out", str(out), *OVERRIDES, "progress=false"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    status = json.loads(stdout.strip().splitlines()[-1])
    assert status["status"] == "interrupted", status
    k = status["iteration"]
    assert 1 <= k < N
    assert (out / "last_checkpoint").read_text().strip() == f"model_{k:07d}.pt"
    assert "SIGTERM" in stderr

    result = train(make_cfg(data_root, out), resume=True)
    assert result["iteration"] == N
    assert_same_weights(safe_load(out / "model_final.pt")["model"], reference["model"])
    assert iterations_logged(out) == list(range(1, N + 1))
