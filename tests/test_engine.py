"""Training engine: optimizer groups, lr schedules, the training loop (overfitting a few
synthetic images), metrics log, checkpoint rotation, non-finite steps."""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import proscale  # noqa: E402
from proscale.config import SolverConfig  # noqa: E402
from proscale.engine.optim import LRSchedule, build_lr_scheduler, build_optimizer, param_groups  # noqa: E402
from proscale.engine.train import TrainConfig, split_overrides, train  # noqa: E402


def tiny_cfg(root: str, out: str, *overrides: str, preset: str = "m2f_tiny") -> TrainConfig:
    cfg = TrainConfig(preset=preset, output_dir=out, progress=False)
    cfg.data.train = (f"synthetic:{root}",)
    split_overrides(cfg, ["batch_size=2", "log_period=1", "checkpoint_period=0", "eval_period=0",
                          "data.augmentation=none", "data.min_size_test=0", "data.num_workers=0",
                          "loss.num_points=1024", *overrides])
    return cfg


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    from proscale.data import generate_synthetic

    return generate_synthetic(str(tmp_path_factory.mktemp("synth") / "s64"), num_train=4, num_val=2,
                              image_size=64, seed=0, difficulty="easy")


# ------------------------------------------------------------------------------ optimizer
def test_param_groups_decay_and_backbone_lr():
    model = proscale.build_model("proscale_tiny_333")
    cfg = SolverConfig(lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "decay", "no_decay"}
    names = {n: g for g in groups.values() for n in g["names"]}
    assert len(names) == sum(1 for _ in model.parameters())  # every parameter exactly once

    # Backbone at lr x 0.1, the rest at lr.
    for g in groups.values():
        assert g["lr"] == pytest.approx(1e-5 if g["name"].startswith("backbone") else 1e-4)
    assert all(n.startswith("backbone.") == g["name"].startswith("backbone") for n, g in names.items())

    # No decay on norms (BN in the backbone, GN / LN elsewhere) and embeddings.
    no_decay = set(groups["no_decay"]["names"]) | set(groups["backbone_no_decay"]["names"])
    for name in ("transformer_decoder.query_feat.weight", "transformer_decoder.query_embed.weight",
                 "transformer_decoder.level_embed.weight", "pixel_decoder.level_embed",
                 "transformer_decoder.decoder_norm.weight", "transformer_decoder.decoder_norm.bias",
                 "pixel_decoder.input_proj.0.1.weight", "backbone.body.bn1.weight"):
        assert name in no_decay, name
    modules = dict(model.named_modules())
    for name in no_decay:
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else model
        is_norm = "norm" in type(owner).__name__.lower()
        assert is_norm or "embed" in name or "query" in name, name
    # Convolutions, linear layers and their biases are decayed.
    decay = set(groups["decay"]["names"]) | set(groups["backbone_decay"]["names"])
    for name in ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias",
                 "pixel_decoder.input_proj.0.0.weight", "backbone.body.conv1.weight"):
        assert name in decay, name
    for g in groups.values():
        assert g["weight_decay"] == (0.0 if "no_decay" in g["name"] else 0.05)

    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups} == {
        "backbone_decay": (1e-5, 0.05), "backbone_no_decay": (1e-5, 0.0), "decay": (1e-4, 0.05), "no_decay": (1e-4, 0.0)}


def test_step_schedule_with_warmup():
    s = LRSchedule("step", max_iter=100, milestones=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.01)
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s(10) == 1.0
    assert s(59) == 1.0
    assert s(60) == pytest.approx(0.1)
    assert s(79) == pytest.approx(0.1)
    assert s(80) == pytest.approx(0.01)
    assert s(99) == pytest.approx(0.01)


def test_poly_and_constant_schedules():
    s = LRSchedule("poly", max_iter=100, power=0.9)
    assert s(0) == 1.0
    assert s(50) == pytest.approx(0.5 ** 0.9)
    assert s(100) == 0.0
    assert LRSchedule("constant", 10)(7) == 1.0
    with pytest.raises(ValueError):
        LRSchedule("cosine", 10)


def test_scheduler_drives_group_lrs_and_default_milestones():
    model = torch.nn.Linear(2, 2)
    cfg = SolverConfig(lr=1.0, schedule="step")  # milestones from the COCO fractions
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, 368750)
    assert sched.lr_lambdas[0].milestones == [327778, 355092]
    cfg = SolverConfig(lr=1.0, schedule="step", steps=(2, 4))
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # The schedule lives in the scheduler's state_dict (checkpoints / resume).
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["milestones"] == [2, 4]


def test_pixel_decoder_stays_fp32_under_autocast():
    """AMP: the pixel decoder runs in fp32 (autocast off, inputs cast), the rest in low precision.
    (CUDA fp16 is what training uses; bf16 autocast on the CPU exercises the same wrapper.)"""
    from proscale.engine.loop import keep_fp32

    model = proscale.build_model("m2f_tiny", num_classes=4)
    keep_fp32(model.pixel_decoder)
    seen = {}
    model.pixel_decoder.register_forward_hook(lambda m, args, out: seen.update(
        inputs={v.dtype for v in args[0].values()}, mask_features=out[0].dtype, maps={t.dtype for t in out[1]}))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert seen["inputs"] == {torch.bfloat16}  # the backbone ran in bf16 ...
    assert seen["mask_features"] == torch.float32 and seen["maps"] == {torch.float32}  # ... the pixel decoder not
    assert out["pred_logits"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------ the loop
def test_overfits_four_images(tmp_path):
    """A tiny model learns 4 synthetic 64 px images to PQ >= 90 on those images."""
    from proscale.data import generate_synthetic

    root = generate_synthetic(str(tmp_path / "data"), num_train=4, num_val=1, image_size=64, seed=0,
                              difficulty="easy")
    cfg = tiny_cfg(root, str(tmp_path / "run"), "batch_size=4", "iterations=60", "log_period=10",
                   "solver.lr=2e-3", "solver.schedule=constant", "solver.backbone_multiplier=1.0",
                   "test.instance_on=false")
    cfg.data.val, cfg.data.val_split = f"synthetic:{root}", "train"
    start = time.time()
    result = train(cfg)
    elapsed = time.time() - start
    pq = result["eval"]["panoptic"]
    print(f"overfit: PQ {pq['PQ']:.1f} (SQ {pq['SQ']:.1f}, RQ {pq['RQ']:.1f}) after {cfg.iterations} "
          f"iterations in {elapsed:.0f} s")
    assert result["status"] == "completed" and result["iteration"] == 60
    assert pq["num_images"] == 4
    assert pq["PQ"] >= 90.0

    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train_lines] == [10, 20, 30, 40, 50, 60]
    for key in ("loss", "loss_ce", "loss_mask", "loss_dice", "lr", "time", "grad_norm", "eta_s"):
        assert all(key in r for r in train_lines), key
    assert train_lines[-1]["loss"] < 0.5 * train_lines[0]["loss"]
    assert records[-1]["iteration"] == 60 and records[-1]["eval"]["panoptic"]["PQ"] == pytest.approx(pq["PQ"])
    assert (tmp_path / "run" / "model_final.pt").is_file()
    assert (tmp_path / "run" / "last_checkpoint").read_text().strip() == "model_final.pt"


def test_checkpoints_rotate_and_config_written(synth64, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(synth64, str(out), "iterations=4", "checkpoint_period=1", "keep_last=2", "log_period=2")
    train(cfg)
    periodic = sorted(p.name for p in out.glob("model_0*.pt"))
    assert periodic == ["model_0000002.pt", "model_0000003.pt"]  # iteration 4 is the final one
    assert (out / "model_final.pt").is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    from proscale.checkpoints.io import safe_load

    ckpt = safe_load(out / "model_final.pt")
    assert ckpt["iteration"] == 4
    assert ckpt["train_config"]["iterations"] == 4
    assert [c["name"] for c in ckpt["metadata"]["categories"]][:2] == ["circle", "square"]
    assert ckpt["config"]["num_classes"] == 8
    from proscale.engine.train import load_config

    again = load_config(str(out / "config.yaml"))
    assert again.iterations == 4 and again.data.train == (f"synthetic:{synth64}",)


def test_nonfinite_steps_are_skipped_then_stop(synth64, tmp_path, monkeypatch):
    """A NaN loss skips the step (weights unchanged); max_nonfinite in a row save and stop."""
    from proscale.engine import train as train_mod
    from proscale.models import criterion as crit_mod

    calls = {"n": 0}
    real = crit_mod.SetCriterion.forward

    def poisoned(self, outputs, targets):
        losses = real(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] >= 2:  # iteration 1 is fine, then every loss is NaN
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(crit_mod.SetCriterion, "forward", poisoned)
    out = tmp_path / "run"
    cfg = tiny_cfg(synth64, str(out), "iterations=10", "max_nonfinite=3")
    with pytest.raises(train_mod.NonFiniteLossError):
        train(cfg)
    from proscale.checkpoints.io import safe_load

    ckpt = safe_load(out / "model_0000004.pt")  # 1 good + 3 skipped steps
    assert ckpt["iteration"] == 4
    # The skipped steps left the weights as the good step made them: Adam's step count is 1.
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {1}
    assert all(math.isfinite(v.float().abs().sum().item()) for v in ckpt["model"].values())


def test_bad_training_sample_stops_or_is_skipped(tmp_path):
    from proscale.data import DataError, generate_synthetic

    root = generate_synthetic(str(tmp_path / "data"), num_train=4, num_val=1, image_size=64, seed=0)
    bad = sorted((tmp_path / "data" / "train").iterdir())[1]
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=bad.name):
        train(tiny_cfg(root, str(tmp_path / "stop"), "iterations=2"))
    result = train(tiny_cfg(root, str(tmp_path / "skip"), "iterations=2", "data.skip_bad_samples=true"))
    assert result["status"] == "completed"
    records = [json.loads(line) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert sum(r.get("skipped", 0) for r in records) >= 1  # 4 images, 2 x 2 drawn: the bad one is hit


def test_periodic_evaluation_evaluates_what_semantic_val_data_supports(tmp_path):
    """A semantic folder as validation data with semantic_on off (the default): the run still
    evaluates, on mIoU, and says why."""
    import numpy as np

    from tests.test_data import write_semantic

    rng = np.random.default_rng(0)
    labels = [np.kron(rng.integers(0, 3, size=(4, 4)), np.ones((16, 16), dtype=np.int64)) for _ in range(4)]
    cats = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "c"}]
    for split in ("training", "validation"):
        write_semantic(str(tmp_path / "sem"), labels, split=split, categories=cats)
    cfg = tiny_cfg(str(tmp_path / "sem"), str(tmp_path / "out"), "iterations=2", "eval_period=1",
                   preset="m2f_nano")
    cfg.data.train = (f"semantic:{tmp_path / 'sem'}",)
    cfg.data.val = f"semantic:{tmp_path / 'sem'}"
    assert not cfg.test.semantic_on
    result = train(cfg)
    assert set(result["eval"]) == {"semantic"} and 0.0 <= result["eval"]["semantic"]["mIoU"] <= 100.0
    assert "semantic ground truth only" in (tmp_path / "out" / "log.txt").read_text()
    evals = [json.loads(line)["eval"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
             if "eval" in line]
    assert len(evals) == 2 and all("semantic" in e for e in evals)


def test_tensorboard_events_hold_the_logged_numbers(synth64, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    cfg = tiny_cfg(synth64, str(out), "iterations=3", "eval_period=0", preset="m2f_nano")
    cfg.data.val = f"synthetic:{synth64}"
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["iteration"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    assert "eval/panoptic/PQ" in tags and "train/lr" in tags
    final = next(r["eval"] for r in records if "eval" in r)
    assert acc.Scalars("eval/panoptic/PQ")[-1].value == pytest.approx(final["panoptic"]["PQ"])
