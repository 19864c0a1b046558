"""DDP: `torchrun --nproc_per_node 2 -m proscale train` on CPU (gloo) takes the gradient step of
one process with the same global batch, that step equals the gradient written down from the
loss's definition, only rank 0 writes files; and the mask-count normaliser is reduced over ranks.

Plain SGD without clipping or weight decay, so the first update is exactly -lr * gradient: a
missing (or doubled) division by the world size or by the accumulation count shows as a factor
of 2 in the comparison (AdamW and clipping would normalise it away)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proscale.checkpoints.io import safe_load
from proscale.engine.loop import BatchStream, step_seed
from proscale.engine.train import TrainConfig, build_model_config, build_train_dataset, split_overrides, train

ROOT = Path(__file__).resolve().parents[1]
LR = 0.05
# Global batch 2: one image per rank, or one process with two micro-batches of one image
# (accumulate=2). Micro-batch g of a step sees the same image, augmentation and RNG either way.
# FrozenBN: with BatchNorm in training mode the running statistics would be rank 0's alone
# under DDP (it broadcasts buffers) but both micro-batches' in one process.
COMMON = ["iterations=3", "batch_size=2", "log_period=1", "checkpoint_period=1", "keep_last=0", "eval_period=0",
          "data.augmentation=resize", "data.min_size_train=48,64", "data.max_size_train=64", "data.flip=true",
          "data.min_size_test=0", "data.num_workers=0", "loss.num_points=512", "solver.optimizer=sgd",
          f"solver.lr={LR}", "solver.momentum=0", "solver.weight_decay=0", "solver.clip_grad=0",
          "solver.backbone_multiplier=1", "solver.schedule=constant", "solver.warmup_iters=0", "backbone.freeze_bn=true", "device=cpu",
          "progress=false", "seed=5"]


def first_step_gradient(run: Path, init: dict) -> dict:
    """-(w1 - w0) / lr: the gradient the run's first SGD step applied."""
    w1 = safe_load(run / "model_0000001.pt")["model"]
    return {k: (init[k].double() - w1[k].double()) / LR for k in init if init[k].is_floating_point()}


def reference_gradient(cfg: TrainConfig) -> tuple[dict, dict]:
    """(initial weights, gradient of the first step) from the definition of the step's loss:
    the class loss is the mean over the global batch's micro-batches, the mask losses the mean
    over all of its masks, i.e. sum_g [w_ce CE_g / G + sum_mask_losses_g / N] with the
    criterion's per-micro-batch mask mean times n_g giving that sum; one micro-batch of one image
    at a time, seeded as the trainer seeds global micro-batch g."""
    from proscale.data import build_dataloader
    from proscale.models.criterion import build_criterion
    from proscale.models.maskformer import build_maskformer

    dataset, metadata = build_train_dataset(cfg)
    mcfg = build_model_config(cfg, metadata.num_classes)
    torch.manual_seed(cfg.seed)
    model = build_maskformer(mcfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    criterion = build_criterion(mcfg.num_classes, cfg.loss)
    stream = BatchStream(build_dataloader(dataset, 1, train=True, num_workers=0, seed=cfg.seed, distributed=False))
    batches = [next(stream) for _ in range(2)]
    counts = [len(b["targets"][0]["labels"]) for b in batches]
    total_masks = sum(counts)
    model.train()
    for g, batch in enumerate(batches):
        torch.manual_seed(step_seed(cfg.seed, 0, g))
        outputs = model(batch["images"])
        losses = criterion(outputs, batch["targets"])
        loss = sum(criterion.weight(n) * v * (1 / len(batches) if n.startswith("loss_ce") else counts[g] / total_masks)
                   for n, v in losses.items())
        loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return init, grads


def assert_same_gradient(got: dict, want: dict, what: str) -> None:
    keys = sorted(want)
    a = torch.cat([got[k].flatten() for k in keys])
    b = torch.cat([want[k].flatten() for k in keys])
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{what}: relative gradient difference {rel:.2e} (|g| = {b.norm():.3g})")
    assert b.norm() > 0
    assert rel < 1e-4, f"{what}: relative gradient difference {rel:.3g}"
    for k in keys:  # no single tensor (e.g. only the backbone) scaled differently
        if want[k].norm() > 1e-3 * b.norm():
            assert ((got[k] - want[k]).norm() / want[k].norm()).item() < 1e-3, f"{what}: {k}"


def test_torchrun_two_processes_match_one_and_the_definition(tmp_path):
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
        ".lock", "config.yaml", "last_checkpoint", "log.txt", "metrics.jsonl", "model_0000001.pt",
        "model_0000002.pt", "model_final.pt", "tensorboard"]
    records = [json.loads(line) for line in open(ddp_out / "metrics.jsonl")]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]
    evals = [r for r in records if "eval" in r]
    assert len(evals) == 1
    assert evals[0]["eval"]["panoptic"]["num_images"] == 2  # one image per rank, gathered

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from proscale.recipes import recipe_config

        cfg = recipe_config(None, "m2f_tiny")  # what the command above runs
        cfg.output_dir, cfg.progress = str(tmp_path / "single"), False
        cfg.data.train, cfg.data.val = (spec,), spec
        split_overrides(cfg, COMMON + ["solver.accumulate=2"])
        single = train(cfg)
        init, want = reference_gradient(cfg)
    finally:
        torch.set_num_threads(n)

    assert_same_gradient(first_step_gradient(tmp_path / "single", init), want, "1 process, accumulate=2")
    assert_same_gradient(first_step_gradient(ddp_out, init), want, "2 processes (DDP)")
    # The same total loss is logged (rank-averaged under DDP).
    single_losses = [json.loads(line)["loss"] for line in open(tmp_path / "single" / "metrics.jsonl")
                     if '"loss"' in line]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(single_losses, rel=1e-5)
    assert single["eval"]["panoptic"]["num_images"] == 2


# ----------------------------------------------------------------------- mask-count reduction
def _mask_losses_on_rank(rank: int, store: str, results) -> None:
    """Rank r holds 1 + 2r target masks (1 and 3: mean 2). Its mask losses under 2 processes must
    be its one-process losses times n_r / mean(n): the criterion normalises by the masks of the
    whole global batch; the class loss is per process and unchanged."""
    from proscale.config import LossConfig
    from proscale.models.criterion import build_criterion

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    Q, K, H = 4, 3, 16
    n = 1 + 2 * rank
    outputs = {"pred_logits": torch.randn(1, Q, K + 1, generator=gen),
               "pred_masks": torch.randn(1, Q, H // 4, H // 4, generator=gen)}
    targets = [{"labels": torch.arange(n) % K, "masks": torch.rand(n, H, H, generator=gen) > 0.5}]
    criterion = build_criterion(K, LossConfig(num_points=64, deep_supervision=False))
    torch.manual_seed(0)
    alone = criterion(outputs, targets)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        together = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    results[rank] = {k: (float(alone[k]), float(together[k])) for k in alone}


def test_mask_count_is_reduced_over_two_processes(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    mp.start_processes(_mask_losses_on_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True,
                       start_method="spawn")
    for rank, n in ((0, 1), (1, 3)):
        losses = results[rank]
        assert losses["loss_ce"][1] == pytest.approx(losses["loss_ce"][0], rel=1e-6)
        for key in ("loss_mask", "loss_dice"):
            alone, together = losses[key]
            assert alone > 0
            assert together == pytest.approx(alone * n / 2, rel=1e-5), (rank, key)
