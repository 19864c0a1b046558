"""`proscale train --init`: fine-tuning onto other classes, upgrading Mask2Former to PRO-SCALE
(encoder layers mapped level by level), and distillation from a teacher."""
from __future__ import annotations

import json

import pytest
import torch

import proscale
from proscale.checkpoints.errors import CheckpointError
from proscale.checkpoints.warm_start import source_layer, warm_start
from proscale.checkpoints.io import save_model
from proscale.engine.train import TrainConfig, split_overrides, train
from proscale.models.distill import FeatureTeacher, feature_distill_loss

NAMES = ["circle", "square", "triangle", "star", "ring", "sky", "water", "ground"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from proscale.data import generate_synthetic

    return generate_synthetic(str(tmp_path_factory.mktemp("synth") / "s64"), num_train=8, num_val=2,
                              image_size=64, seed=0, difficulty="easy")


def _save(model, path, names=NAMES):
    meta = {"name": "synthetic", "categories": [{"id": i + 1, "name": n, "isthing": i < 5} for i, n in enumerate(names)]}
    save_model(model, str(path), extra={"metadata": meta})
    return path


def _cfg(root, out, *overrides, preset="m2f_nano", spec="synthetic"):
    cfg = TrainConfig(preset=preset, output_dir=str(out), progress=False)
    cfg.data.train = (f"{spec}:{root}",)
    split_overrides(cfg, ["batch_size=2", "log_period=1", "checkpoint_period=0", "eval_period=0",
                          "data.augmentation=none", "data.min_size_test=0", "data.num_workers=0",
                          "loss.num_points=256", "solver.clip_grad=1.0", "solver.lr=1e-3", *overrides])
    return cfg


def test_class_head_follows_names_and_the_rest_is_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = proscale.build_model("m2f_nano", num_classes=8)
    path = _save(trained, tmp_path / "m.pt")
    torch.manual_seed(1)
    model = proscale.build_model("m2f_nano", num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_start(model, path, class_names=["star", "kite", "circle"])
    got, src = model.state_dict(), trained.state_dict()
    for key, value in got.items():
        if key.startswith("transformer_decoder.class_embed."):
            continue
        assert torch.equal(value, src[key]), key
    for part in ("weight", "bias"):
        key = f"transformer_decoder.class_embed.{part}"
        assert torch.equal(got[key][0], src[key][3])  # star
        assert torch.equal(got[key][1], fresh[key][1])  # kite: not in the file, fresh
        assert torch.equal(got[key][2], src[key][0])  # circle
        assert torch.equal(got[key][3], src[key][8])  # "no object"
    table = report.table()
    assert "2 of 3 classes found by name" in table and "transformer_decoder" in table


def test_other_class_count_without_names_keeps_only_no_object(tmp_path):
    trained = proscale.build_model("m2f_nano", num_classes=8)
    path = tmp_path / "m.pt"
    save_model(trained, str(path))
    model = proscale.build_model("m2f_nano", num_classes=4)
    before = model.state_dict()["transformer_decoder.class_embed.weight"].clone()
    report = warm_start(model, path)
    w = model.state_dict()["transformer_decoder.class_embed.weight"]
    assert torch.equal(w[:4], before[:4]) and torch.equal(w[4], trained.state_dict()["transformer_decoder.class_embed.weight"][8])
    assert any("no names" in n for n in report.notes)


def test_init_rejects_a_file_with_nothing_that_fits(tmp_path):
    torch.save({"model": {"x.weight": torch.zeros(3)}}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="junk.pt"):
        warm_start(proscale.build_model("m2f_nano"), tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        warm_start(proscale.build_model("m2f_nano"), tmp_path / "missing.pt")


def test_layer_maps():
    assert [source_layer(i, 7, 6, "depth") for i in range(7)] == [0, 0, 1, 2, 3, 4, 5]
    assert [source_layer(i, 9, 6, "depth") for i in range(9)] == [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert [source_layer(i, 7, 6) for i in range(7)] == [0, 1, 2, 3, 4, 5, 5]
    with pytest.raises(ValueError, match="init_layer_map"):
        source_layer(0, 7, 6, "middle")


def test_mask2former_upgrade_maps_each_layer_on_its_levels(tmp_path):
    torch.manual_seed(0)
    base = proscale.build_model("m2f_nano", num_classes=8)
    path = _save(base, tmp_path / "m2f.pt")
    model = proscale.build_model("proscale_nano_331_conv", num_classes=8)
    report = warm_start(model, path, class_names=NAMES, layer_map="depth")
    enc, src = model.pixel_decoder.encoder, base.pixel_decoder.encoder
    assert [layer.self_attn.n_levels for layer in enc.layers] == [1, 1, 1, 2, 2, 2, 3]
    # Layer 3 (2 levels) comes from base layer 2 (depth map): its attention logits are the base
    # layer's logits of the first two levels, for every query and head.
    q = torch.randn(5, 64)
    for j, i in ((0, 0), (3, 2), (6, 5)):
        a, b = enc.layers[j].self_attn, src.layers[i].self_attn
        lv, H, P = a.n_levels, a.n_heads, a.n_points
        assert torch.allclose(a.attention_weights(q), b.attention_weights(q).view(5, H, 3, P)[:, :, :lv].reshape(5, -1))
        assert torch.allclose(a.sampling_offsets(q),
                              b.sampling_offsets(q).view(5, H, 3, P, 2)[:, :, :lv].reshape(5, -1))
        assert torch.equal(a.value_proj.weight, b.value_proj.weight)
        assert torch.equal(enc.layers[j].linear1.weight, src.layers[i].linear1.weight)
    # Everything outside the encoder layers and TRC is the baseline's.
    got, want = model.state_dict(), base.state_dict()
    for key in want:
        if not key.startswith(("pixel_decoder.encoder.", )):
            assert torch.equal(got[key], want[key]), key
    gate = torch.sigmoid(enc.trc.temperature * enc.trc.score.bias)
    assert torch.allclose(gate, torch.tensor(0.9)) and not enc.trc.score.weight.any()
    assert len(report.mapped) == 7 * len([k for k in want if k.startswith("pixel_decoder.encoder.layers.0.")])


def test_same_plan_upgrade_reproduces_the_baseline(tmp_path):
    """Plan (0,0,6) without TRC is Mask2Former: warm-starting it from Mask2Former gives its outputs."""
    base = proscale.build_model("m2f_nano", num_classes=8).eval()
    path = _save(base, tmp_path / "m2f.pt")
    model = proscale.build_model("proscale_nano_333", num_classes=8, overrides=[
        "encoder.plan=0,0,6", "encoder.trc=false", "encoder.output=conv"]).eval()
    warm_start(model, path, class_names=NAMES)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.allclose(model(x)["pred_masks"], base(x)["pred_masks"], atol=1e-5)


def test_finetune_onto_other_classes_from_a_checkpoint(synth, tmp_path):
    """--init with an 8-class panoptic checkpoint, training on the 5-class instance data: the
    weights before the first step are the checkpoint's (head by name), and the loss falls."""
    first = train(_cfg(synth, tmp_path / "a", "iterations=2"))
    out = tmp_path / "b"
    cfg = _cfg(synth, out, "iterations=0", spec="coco-instances")
    cfg.init = first["checkpoint"]
    train(cfg)
    start, _ = proscale.load_model(out / "model_final.pt")
    src, _ = proscale.load_model(first["checkpoint"])
    assert start.num_classes == 5
    for key, value in start.state_dict().items():
        want = src.state_dict()[key]
        if key.startswith("transformer_decoder.class_embed."):
            assert torch.equal(value[:5], want[:5]) and torch.equal(value[5], want[8])  # circle..ring, no object
        else:
            assert torch.equal(value, want), key
    cfg = _cfg(synth, tmp_path / "c", "iterations=30", "solver.schedule=constant", spec="coco-instances")
    cfg.init = first["checkpoint"]
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses


def test_distillation_loss_and_its_gradient(tmp_path):
    base = proscale.build_model("m2f_nano", num_classes=8).eval()
    teacher = FeatureTeacher(base)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    x = [torch.rand(3, 64, 64) * 255]
    same = feature_distill_loss(base.forward_pixel_decoder(x)[0], teacher(x))
    assert same.item() < 1e-10  # equal up to float rounding (inference takes a channels-last path)
    student = proscale.build_model("proscale_nano_331_conv", num_classes=8)
    loss = feature_distill_loss(student.forward_pixel_decoder(x)[0], teacher(x))
    loss.backward()
    assert loss.item() > 0 and student.pixel_decoder.encoder.layers[0].linear1.weight.grad.abs().sum() > 0


def test_train_with_distillation_logs_the_loss(synth, tmp_path):
    base = proscale.build_model("m2f_nano", num_classes=8)
    path = _save(base, tmp_path / "m2f.pt")
    cfg = _cfg(synth, tmp_path / "d", "iterations=2", f"loss.distill_from={path}", preset="proscale_nano_331_conv")
    cfg.init = str(path)
    result = train(cfg)
    assert "loss_distill" in result["losses"]
