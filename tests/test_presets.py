"""The preset registry, and every registered preset built and run.

Every preset is built on the meta device: parameters get shapes but no storage, so even the
R50 / Swin-T presets cost no memory and no initialisation time, and a forward pass propagates
shapes only. That is enough to catch a preset whose parts do not fit together (channels,
heads, levels, queries), which is what this file is about; numbers are tested elsewhere.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import proscale
from proscale import presets
from proscale.config import BackboneConfig, DetrConfig, ModelConfig, to_dict
from proscale.models.backbone import build_backbone
from proscale.models.detr import DeformableDETR

EXPECTED_PRESETS = [
    "ddetr_nano", "ddetr_r50", "ddetr_r50_twostage_refine",
    "m2f_nano", "m2f_r50", "m2f_swin_t", "m2f_tiny",
    "proscale_ddetr_nano_1113", "proscale_ddetr_nano_2222", "proscale_ddetr_r50_1113", "proscale_ddetr_r50_2220",
    "proscale_ddetr_r50_2222", "proscale_ddetr_r50_2222_twostage_refine",
    "proscale_nano_331_conv", "proscale_nano_333", "proscale_r50_111",
    "proscale_r50_222", "proscale_r50_333", "proscale_swin_t_111", "proscale_swin_t_222",
    "proscale_swin_t_333", "proscale_tiny_333",
]
SEGMENTATION = [n for n in EXPECTED_PRESETS if "ddetr" not in n]
DETECTION = [n for n in EXPECTED_PRESETS if "ddetr" in n]


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry for tests that register presets, restored afterwards."""
    monkeypatch.setattr(presets, "PRESETS", dict(presets.PRESETS))
    return presets.PRESETS


# ------------------------------------------------------------------ every registered preset

@pytest.mark.parametrize("name", SEGMENTATION)
def test_preset_builds_and_runs_on_meta(name):
    cfg = presets.get_preset(name)
    assert isinstance(cfg, ModelConfig)
    with torch.device("meta"):
        model = proscale.build_model(name).eval()
        images = torch.zeros(1, 3, 64, 96)
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert model.num_classes == cfg.num_classes
    with torch.no_grad():
        out = model(images)
    q, k = cfg.decoder.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (1, q, k + 1)
    assert out["pred_masks"].shape == (1, q, 64 // 4, 96 // 4)
    # One prediction from the queries before the first layer, one after each but the last.
    assert len(out["aux_outputs"]) == cfg.decoder.dec_layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    assert out["image_sizes"] == [(64, 96)] and out["padded_size"] == (64, 96)


@pytest.mark.parametrize("name", DETECTION)
def test_detection_preset_builds_and_runs_on_meta(name):
    """A DetrConfig preset builds a DeformableDETR (the family follows from the config type)."""
    cfg = presets.get_preset(name)
    assert isinstance(cfg, DetrConfig) and len(cfg.encoder.plan) == 4
    with torch.device("meta"):
        model = proscale.build_model(name).eval()
        images = torch.zeros(1, 3, 256, 320)  # two-stage R50 keeps 300 of the 1,700 encoder tokens
    assert isinstance(model, DeformableDETR) and all(p.is_meta for p in model.parameters())
    assert model.num_classes == cfg.num_classes and model.encoder.plan == tuple(cfg.encoder.plan)
    with torch.no_grad():
        out = model(images)
    q, k = cfg.decoder.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (1, q, k) and out["pred_boxes"].shape == (1, q, 4)
    assert len(out["aux_outputs"]) == cfg.decoder.layers - 1
    assert ("enc_outputs" in out) == cfg.decoder.two_stage
    if name.startswith("proscale_"):
        assert model.encoder.trc is not None and sum(cfg.encoder.plan) >= 6
    else:
        assert model.encoder.trc is None and cfg.encoder.plan == (0, 0, 0, 6)


def test_registry_holds_the_documented_presets():
    # Names are part of the interface: configs, checkpoints and the CLI refer to them.
    assert presets.list_presets() == EXPECTED_PRESETS
    assert proscale.list_presets is presets.list_presets


# ------------------------------------------------------------------ registry behaviour

def test_list_presets_filter():
    assert presets.list_presets("proscale_r50_*") == ["proscale_r50_111", "proscale_r50_222", "proscale_r50_333"]
    assert presets.list_presets("*nano*") == ["ddetr_nano", "m2f_nano", "proscale_ddetr_nano_1113",
                                              "proscale_ddetr_nano_2222", "proscale_nano_331_conv", "proscale_nano_333"]
    assert presets.list_presets("*ddetr_r50*") == [n for n in DETECTION if "r50" in n]
    assert presets.list_presets("m2f_*") == ["m2f_nano", "m2f_r50", "m2f_swin_t", "m2f_tiny"]
    assert presets.list_presets("*_33?") == [n for n in EXPECTED_PRESETS if n.endswith("_333")]
    assert presets.list_presets("resnet*") == []


def test_register_preset_adds_and_refuses_duplicates(scratch_registry):
    def my_tiny() -> ModelConfig:
        return ModelConfig(num_classes=3)

    assert presets.register_preset(my_tiny) is my_tiny
    assert "my_tiny" in presets.list_presets() and presets.get_preset("my_tiny").num_classes == 3

    original = scratch_registry["m2f_r50"]

    def m2f_r50() -> ModelConfig:
        return ModelConfig(num_classes=1)

    with pytest.raises(ValueError, match="'m2f_r50'"):
        presets.register_preset(m2f_r50)
    with pytest.raises(ValueError, match="'my_tiny'"):
        presets.register_preset(my_tiny)
    assert scratch_registry["m2f_r50"] is original  # the first registration stands
    assert presets.get_preset("m2f_r50").num_classes == 133


def test_get_preset_unknown_name_suggests_close_ones():
    with pytest.raises(KeyError, match="proscale_r50_333") as err:
        presets.get_preset("proscale_r50_33")
    assert "unknown preset 'proscale_r50_33'" in str(err.value)
    with pytest.raises(KeyError, match="m2f_swin_t"):
        presets.get_preset("m2f_swint")
    with pytest.raises(KeyError, match="choose from ddetr_nano, ddetr_r50, ddetr_r50_twostage_refine, m2f_nano"):  # nothing close: all names
        presets.get_preset("zzz")


@pytest.mark.parametrize("name", presets.list_presets())
def test_get_preset_returns_independent_configs(name):
    a, b = presets.get_preset(name), presets.get_preset(name)
    assert a == b and a is not b
    for field in dataclasses.fields(type(a)):
        value = getattr(a, field.name)
        if dataclasses.is_dataclass(value):
            assert value is not getattr(b, field.name), field.name
    a.num_classes, a.encoder.d_model, a.decoder.num_queries, a.backbone.name = 1, 8, 2, "x"
    a.encoder.plan = (9,)
    assert presets.get_preset(name) == b  # changing one copy changed no other, nor the preset


# ------------------------------------------------------------------ building leaves inputs alone

def test_build_model_leaves_the_callers_config_unchanged():
    cfg = presets.get_preset("m2f_nano")
    before = to_dict(cfg)
    with torch.device("meta"):
        model = proscale.build_model(cfg, num_classes=5, overrides=["decoder.num_queries=7", "encoder.plan=1,1,1"])
    assert to_dict(cfg) == before
    assert model.num_classes == 5 and model.cfg is not cfg
    assert model.cfg.decoder.num_queries == 7 and model.cfg.encoder.plan == (1, 1, 1)
    assert model.cfg.encoder is not cfg.encoder


def test_building_a_backbone_leaves_the_environment_alone(monkeypatch):
    # conftest sets HF_HUB_OFFLINE for the whole session; remove it so that a build which sets
    # it again (as an earlier version did) would show up as a change.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = dict(os.environ)
    with torch.device("meta"):
        build_backbone(BackboneConfig("resnet18", pretrained=""))
    assert dict(os.environ) == before
