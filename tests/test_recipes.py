"""Training recipes: every preset has one, derived settings follow the data, ignored keys are errors."""
from __future__ import annotations

import pytest
import yaml

from proscale.config import TrainConfig
from proscale.engine.train import main as train_main
from proscale.presets import list_presets
from proscale.recipes import (check_ignored, default_recipe, flat_keys, ignored_keys, list_recipes, load_recipe,
                              recipe_config, resolve_derived)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from proscale.data import generate_synthetic

    return generate_synthetic(str(tmp_path_factory.mktemp("synth") / "s64"), num_train=4, num_val=2,
                              image_size=64, seed=0, difficulty="easy")


def test_every_recipe_loads_and_sets_no_key_it_ignores():
    assert {"coco", "ade20k", "small", "ddetr", "small_detection"} <= set(list_recipes())
    for name in list_recipes():
        cfg = recipe_config(name, "m2f_r50")
        assert cfg.recipe == name
        check_ignored(cfg, flat_keys(load_recipe(name)))  # raises on a key without effect


def test_every_preset_has_a_recipe():
    for preset in list_presets():
        small = "_nano" in preset or "_tiny" in preset
        if "ddetr" in preset:
            expected = "small_detection" if small else "ddetr"
        else:
            expected = "small" if small else "coco"
        assert default_recipe(preset) == expected, preset
    assert load_recipe("small_detection")["solver"]["lr"] == 1e-3  # its own value
    assert load_recipe("small_detection")["solver"]["warmup_iters"] == 50  # from its base, small
    assert "base" not in load_recipe("small_detection")


def test_coco_recipe_derives_mask2formers_values_at_1024_and_follows_the_size():
    cfg = recipe_config("coco", "m2f_r50")
    resolve_derived(cfg)
    assert (cfg.loss.num_points, cfg.data.min_size_test, cfg.data.max_size_test) == (12544, 800, 1333)
    assert (cfg.solver.lr, cfg.solver.clip_grad, cfg.iterations, cfg.batch_size) == (1e-4, 0.01, 368750, 16)
    cfg = recipe_config("coco", "m2f_r50")
    cfg.data.image_size = 512
    lines = resolve_derived(cfg)
    assert (cfg.loss.num_points, cfg.data.min_size_test, cfg.data.max_size_test) == (3136, 400, 666)
    assert any("loss.num_points=3136" in line for line in lines)
    explicit = TrainConfig()  # values given explicitly are kept
    assert resolve_derived(explicit) == [] and explicit.loss.num_points == 12544


def test_ade20k_recipe_is_semantic():
    cfg = recipe_config("ade20k", "m2f_swin_t")
    resolve_derived(cfg)
    assert cfg.test.semantic_on and not cfg.test.panoptic_on and cfg.data.crop_size == 512
    assert (cfg.data.min_size_test, cfg.solver.schedule) == (512, "poly")


def test_ignored_keys_name_why():
    cfg = recipe_config("small", "m2f_nano")
    assert "data.image_size" in ignored_keys(cfg) and "solver.poly_power" not in ignored_keys(cfg)
    with pytest.raises(ValueError, match=r"data.image_size: data.augmentation=none does not use it"):
        check_ignored(cfg, ["data.image_size", "solver.lr"])
    check_ignored(cfg, ["solver.lr", "iterations"])  # used: no error


def test_train_with_a_preset_works_as_is_and_derives_from_the_data(synth, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(_args(["--preset", "m2f_nano", "--data", f"synthetic:{synth}", "--out", str(out),
                           "iterations=2", "checkpoint_period=0"]))
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recipe"] == "small" and saved["solver"]["lr"] == 2e-3
    assert saved["loss"]["num_points"] == 1024  # 0.25 x 64^2: the images' own size
    assert saved["data"]["min_size_test"] == 0
    log = (out / "log.txt").read_text()
    assert "derived from the data: loss.num_points=1024" in log and "model: m2f_nano" in log


def test_train_refuses_a_key_the_recipe_ignores(synth, tmp_path, capsys):
    rc = train_main(_args(["--preset", "m2f_nano", "--data", f"synthetic:{synth}", "--out", str(tmp_path / "r"),
                           "data.image_size=256"]))
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.image_size" in err and "augmentation=none" in err
    assert not (tmp_path / "r").exists()  # nothing started


def _args(argv):
    from proscale.cli import build_parser

    return build_parser().parse_args(["train", *argv])
