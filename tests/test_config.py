"""Config overrides are parsed as each field's declared type (not as the type of its current
value: an empty tuple says nothing about its items), and configs round-trip through plain data."""
from __future__ import annotations

import dataclasses

import pytest

from proscale.config import ModelConfig, TrainConfig, apply_overrides, from_dict, to_dict
from proscale.engine.checkpointer import plain
from proscale.engine.train import split_overrides


def test_empty_tuple_defaults_parse_as_their_declared_items():
    cfg = TrainConfig()
    assert cfg.data.train == () and cfg.solver.steps == ()
    apply_overrides(cfg, ["data.train=coco-panoptic:/x", "solver.steps=1000,2000"])
    assert cfg.data.train == ("coco-panoptic:/x",)
    assert cfg.solver.steps == (1000, 2000) and all(type(s) is int for s in cfg.solver.steps)
    apply_overrides(cfg, ["data.train=(a:/1, b:/2)"])
    assert cfg.data.train == ("a:/1", "b:/2")


def test_scalars_fixed_length_tuples_and_errors():
    cfg = TrainConfig()
    apply_overrides(cfg, ["solver.betas=0.8,0.95", "data.flip=off", "iterations=7", "solver.lr=3e-4",
                          "data.min_size_train=64"])
    assert cfg.solver.betas == (0.8, 0.95) and cfg.data.flip is False and cfg.iterations == 7
    assert cfg.solver.lr == 3e-4 and cfg.data.min_size_train == (64,)
    with pytest.raises(ValueError, match="solver.betas: expected 2"):
        apply_overrides(cfg, ["solver.betas=0.9"])
    with pytest.raises(ValueError, match="iterations"):
        apply_overrides(cfg, ["iterations=many"])
    with pytest.raises(ValueError, match="boolean"):
        apply_overrides(cfg, ["data.flip=maybe"])
    with pytest.raises(KeyError, match="solver.nope"):
        apply_overrides(cfg, ["solver.nope=1"])
    with pytest.raises(KeyError, match="solver"):
        apply_overrides(cfg, ["solver=1"])  # a section, not a field
    model = ModelConfig()
    apply_overrides(model, ["encoder.plan=3,3,3", "encoder.trc=true"])
    assert model.encoder.plan == (3, 3, 3) and model.encoder.trc is True


def test_train_command_overrides_split_between_run_and_model():
    cfg = split_overrides(TrainConfig(preset="m2f_tiny"),
                          ["data.train=synthetic:/d", "solver.steps=5,9", "encoder.plan=1,1,4", "model.num_classes=3"])
    assert cfg.data.train == ("synthetic:/d",) and cfg.solver.steps == (5, 9)
    assert cfg.model_overrides == ("encoder.plan=1,1,4", "num_classes=3")
    with pytest.raises(KeyError):
        split_overrides(TrainConfig(preset="m2f_tiny"), ["encoder.plann=1,1,4"])  # checked against the preset


def test_train_config_round_trips_through_plain_data():
    cfg = split_overrides(TrainConfig(preset="m2f_tiny"), ["data.train=a:/1,b:/2", "solver.steps=5,9",
                                                          "data.image_size=96", "test.semantic_on=true"])
    back = from_dict(TrainConfig, plain(to_dict(cfg)))  # tuples become lists in JSON / YAML
    assert back == cfg
    assert dataclasses.asdict(back)["data"]["image_size"] == 96
    with pytest.raises(KeyError, match="unknown DataConfig keys"):
        from_dict(TrainConfig, {"data": {"imagesize": 96}})
