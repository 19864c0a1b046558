"""DDP: `torchrun --nproc_per_node 2 -m proscale train` on CPU (gloo) gives the weights of one
process with the same global batch, and only rank 0 writes files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.checkpoints.io import safe_load  # noqa: E402
from proscale.engine.train import TrainConfig, build_model_config, split_overrides, train  # noqa: E402
from proscale.models.maskformer import build_maskformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Global batch 2: one image per rank, or one process with two micro-batches of one image
# (accumulate=2). Micro-batch g of a step sees the same image, augmentation and RNG either way.
# FrozenBN: with BatchNorm in training mode the running statistics would be rank 0's alone
# under DDP (it broadcasts buffers) but both micro-batches' in one process.
COMMON = ["iterations=3", "batch_size=2", "log_period=1", "checkpoint_period=0", "eval_period=0",
          "data.augmentation=resize", "data.min_size_train=48,64", "data.max_size_train=64", "data.flip=true",
          "data.min_size_test=0", "data.num_workers=0", "loss.num_points=512", "solver.lr=1e-4",
          "backbone.freeze_bn=true", "device=cpu", "progress=false", "seed=5"]


def test_torchrun_two_processes_match_one(tmp_path):
    from proscale.data import generate_synthetic

    root = generate_synthetic(str(tmp_path / "data"), num_train=4, num_val=2, image_size=64, seed=1)
    spec = f"synthetic:{root}"
    ddp_out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "proscale", "train", "--preset", "m2f_tiny", "--data", spec, "--val-data", spec,
           "--out", str(ddp_out), *COMMON]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone prints the result line and writes files.
    status_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(status_lines) == 1 and json.loads(status_lines[0])["status"] == "completed"
    assert sorted(p.name for p in ddp_out.iterdir()) == [
        "config.yaml", "last_checkpoint", "log.txt", "metrics.jsonl", "model_final.pt"]
    records = [json.loads(line) for line in open(ddp_out / "metrics.jsonl")]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 1
    assert evals[0]["eval"]["panoptic"]["num_images"] == 2  # one image per rank, gathered

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(preset="m2f_tiny", output_dir=str(tmp_path / "single"), progress=False)
        cfg.data.train, cfg.data.val = (spec,), spec
        single = train(split_overrides(cfg, COMMON + ["solver.accumulate=2"]))
    finally:
        torch.set_num_threads(n)

    a = safe_load(ddp_out / "model_final.pt")["model"]
    b = safe_load(tmp_path / "single" / "model_final.pt")["model"]
    torch.manual_seed(5)  # the initial weights both runs started from (seed=5)
    init = build_maskformer(build_model_config(cfg, 8)).state_dict()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].numel())
    moved = max((b[k].double() - init[k].double()).abs().max().item() for k in b if b[k].numel())
    print(f"DDP vs one process: max weight difference {diff:.3g}; weights moved up to {moved:.3g}")
    assert moved > 1e-4  # it did train
    assert diff <= 1e-6
    # The same total loss is logged (rank-averaged under DDP).
    single_losses = [json.loads(line)["loss"] for line in open(tmp_path / "single" / "metrics.jsonl")
                     if '"loss"' in line]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(single_losses, rel=1e-5)
    assert single["eval"]["panoptic"]["num_images"] == 2
