"""Backbone weights from a local file (timm and torchvision key names), clear errors for files that
do not fit, and freezing."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import proscale
from proscale.models.backbone import BackboneWeightsError, TimmBackbone


def _features(model, x):
    return [f.detach() for f in model(x)]


def test_local_safetensors_equals_timms_own_loading_of_the_file(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("regnetx_002", pretrained=False)
    path = tmp_path / "regnetx_002.safetensors"
    save_file(full.state_dict(), str(path))
    ours = TimmBackbone("regnetx_002", pretrained=str(path)).eval()
    theirs = timm.create_model("regnetx_002", features_only=True, pretrained=True,
                               pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = list(ours(x).values())
        # inference runs a convolutional body in channels-last (TimmBackbone.forward): same layout here
        want = _features(theirs, x.contiguous(memory_format=torch.channels_last))[-4:]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(ours.body.stem.conv.weight, full.stem.conv.weight)
    random = TimmBackbone("regnetx_002").eval()
    assert not torch.equal(random.body.stem.conv.weight, full.stem.conv.weight)


def test_torchvision_resnet_file_loads(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": tv.state_dict()}, path)  # wrapped, as training scripts save
    model = proscale.build_model("m2f_tiny", overrides=[f"backbone.pretrained={path}"])
    assert torch.equal(model.backbone.body.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)


def test_a_file_that_does_not_fit_names_the_file_and_the_keys(tmp_path):
    full = timm.create_model("resnet18", pretrained=False)
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("layer4.1")}
    state["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneWeightsError) as e:
        TimmBackbone("resnet18", pretrained=str(path))
    msg = str(e.value)
    assert "broken.safetensors" in msg and "missing (" in msg and "layer4.1.conv1.weight" in msg
    assert "unexpected (1): extra.weight" in msg and "layer1.0.conv1.weight: file (1, 1, 1, 1)" in msg
    with pytest.raises(BackboneWeightsError, match="no such file"):
        TimmBackbone("resnet18", pretrained=str(tmp_path / "none.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(BackboneWeightsError, match="cannot read it as weights"):
        TimmBackbone("resnet18", pretrained=str(tmp_path / "text.pth"))


@pytest.mark.parametrize("freeze_at, frozen", [(0, set()), (1, {"conv1", "bn1"}), (3, {"conv1", "bn1", "layer1", "layer2"}),
                                               (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})])
def test_freeze_at(freeze_at, frozen):
    b = TimmBackbone("resnet18", freeze_at=freeze_at)
    assert {n.split(".")[1] for n, p in b.named_parameters() if not p.requires_grad} == frozen


def test_frozen_backbone_does_not_move_in_training(tmp_path):
    from proscale.data import generate_synthetic
    from proscale.engine.train import TrainConfig, split_overrides, train

    root = generate_synthetic(str(tmp_path / "d"), num_train=2, num_val=1, image_size=64, seed=0, difficulty="easy")
    cfg = TrainConfig(preset="m2f_nano", output_dir=str(tmp_path / "out"), progress=False)
    cfg.data.train = (f"synthetic:{root}",)
    split_overrides(cfg, ["iterations=2", "batch_size=2", "checkpoint_period=0", "data.augmentation=none",
                          "data.num_workers=0", "loss.num_points=256", "backbone.freeze=true", "solver.lr=1e-2"])
    torch.manual_seed(cfg.seed)
    start = proscale.build_model("m2f_nano", num_classes=8).state_dict()
    train(cfg)
    end, _ = proscale.load_model(tmp_path / "out" / "model_final.pt")
    moved = [k for k, v in end.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and not any(k.startswith("backbone.") and "running" not in k and "num_batches" not in k for k in moved)


def test_frozen_norms_folded_at_inference_give_the_plain_outputs():
    """R50 with FrozenBN: all 53 norms fold into their convs without gradients; the outputs equal
    conv-then-norm, the fold follows new weights (load_state_dict), training runs them apart."""
    from proscale.models.frozen_bn import ConvFrozenBN, FrozenBatchNorm2dInputDtype

    torch.manual_seed(0)
    bb = TimmBackbone("resnet50", freeze_bn=True).eval()
    norms = [m for m in bb.modules() if isinstance(m, FrozenBatchNorm2dInputDtype)]
    assert len(norms) == 53 and all(m.folded for m in norms)
    assert sum(isinstance(m, ConvFrozenBN) for m in bb.modules()) == 53
    for m in norms:  # non-trivial statistics
        m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 96)

    def both():
        with torch.no_grad():
            folded = bb(x)
        plain = bb(x)  # gradients on: conv, then the norm
        return folded, plain

    def close(a, b):  # relative to the map's largest value: the fold only reorders roundings
        return float((a - b.detach()).abs().max() / b.detach().abs().max()) < 1e-5

    folded, plain = both()
    assert all(close(folded[k], plain[k]) for k in plain)
    state = {k: v.clone() for k, v in bb.state_dict().items()}
    state["body.bn1.running_mean"] += 1.0
    bb.load_state_dict(state)
    folded2, plain2 = both()
    assert not torch.allclose(folded2["res2"], folded["res2"])
    assert all(close(folded2[k], plain2[k]) for k in plain2)
    assert list(bb.state_dict()) == list(state)  # same keys: nothing added by the fold


def test_folded_backbone_exports():
    """torch.export of an R50 with folded frozen norms (fake tensors: no cache, the fold is
    traced into the graph) gives the eager outputs."""

    class Res5(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x)["res5"]

    torch.manual_seed(0)
    model = Res5(TimmBackbone("resnet50", freeze_bn=True).eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        torch.testing.assert_close(program.module()(x), model(x))
