"""Checkpoints: detectron2 / HF round trips, config inference, load_model, strict-load errors, no code
from files, atomic save."""
import argparse
import os
import pickle
import re

import numpy as np
import pytest
import torch

import proscale
from proscale.checkpoints import convert as convert_cmd
from proscale.checkpoints import (CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, atomic_save,
                                  from_detectron2, infer_config, load_checkpoint, load_model, safe_load, save_model,
                                  to_detectron2)
from proscale.checkpoints.from_detectron2 import from_detectron2_report, infer_encoder
from proscale.config import to_dict

SIZE = (64, 96)


def run_cli(argv):
    """`proscale ARGV` with only the convert command registered (what cli.main does for all)."""
    parser = argparse.ArgumentParser(prog="proscale")
    convert_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
TINY = ["m2f_tiny", "proscale_tiny_333"]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN statistic random, so a mis-mapped tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.rand(t.shape, generator=g) * 0.2 + 0.9 if name.endswith("running_var") else \
                    torch.randn(t.shape, generator=g) * 0.05
                t.copy_(r)
    return model.eval()


def _images():
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(1)) * 255


_OUTPUTS = {}


def _outputs(model):
    """Forward once per reference model (CPU time is scarce here)."""
    key = id(model)
    if key not in _OUTPUTS:
        with torch.no_grad():
            _OUTPUTS[key] = (model, model(_images()))
    return _OUTPUTS[key][1]


def _same_outputs(a, b):
    oa = _outputs(a)
    with torch.no_grad():
        ob = b(_images())
    assert torch.equal(oa["pred_logits"], ob["pred_logits"])
    assert torch.equal(oa["pred_masks"], ob["pred_masks"])


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return request.param, _randomise(proscale.build_model(request.param))


def _write_official(model, path):
    if path.suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": to_detectron2(model.state_dict(), numpy=True), "__author__": "test",
                         "matching_heuristics": False}, f)
    else:
        torch.save({"model": to_detectron2(model.state_dict())}, path)
    return path


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_detectron2_round_trip_same_weights_and_outputs(tiny, tmp_path, suffix):
    name, model = tiny
    path = _write_official(model, tmp_path / f"official{suffix}")
    other = proscale.build_model(name).eval()
    report = load_checkpoint(other, path)
    assert report.ok and report.source == "detectron2" and report.path == str(path)
    assert report.loaded == len([k for k in model.state_dict() if not k.endswith("num_batches_tracked")])
    _same_state(model, other)
    if suffix == ".pkl":  # the state is identical; one forward shows the model agrees too
        _same_outputs(model, other)
    assert "tensors loaded" in str(report)


def test_official_key_names(tiny):
    name, model = tiny
    official = to_detectron2(model.state_dict())
    pd = "sem_seg_head.pixel_decoder."
    for key in ("backbone.stem.conv1.weight", "backbone.stem.conv1.norm.running_var", "backbone.res2.0.conv1.weight",
                "backbone.res3.0.shortcut.weight", "backbone.res5.1.conv2.norm.running_mean",
                pd + "transformer.level_embed", pd + "input_proj.0.0.weight", pd + "input_proj.2.1.bias",
                pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight", pd + "adapter_1.weight",
                pd + "adapter_1.norm.weight", pd + "layer_1.norm.weight", pd + "mask_features.weight",
                "sem_seg_head.predictor.query_feat.weight", "sem_seg_head.predictor.class_embed.weight",
                "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.in_proj_weight"):
        assert key in official, key
    assert not any(k.endswith("num_batches_tracked") for k in official)
    assert not any("input_proj" in k and "predictor" in k for k in official)  # identity when widths agree
    if name == "proscale_tiny_333":
        assert official[pd + "transformer.encoder.token_excite.ops.weight"].shape == (1, 64)
        assert pd + "layer_1.weight" not in official  # LPE: only its GroupNorm
        widths = [official[pd + f"transformer.encoder.layers.{i}.self_attn.sampling_offsets.weight"].shape[0]
                  for i in range(9)]
        assert widths == [32] * 3 + [64] * 3 + [96] * 3  # 4 heads x L levels x 4 points x 2
    else:
        assert pd + "layer_1.weight" in official


def test_cli_convert_end_to_end(tiny, tmp_path, capsys):
    name, model = tiny
    src = _write_official(model, tmp_path / "official.pkl")
    out = tmp_path / "model.pt"
    assert run_cli(["convert", str(src), "-o", str(out), "--preset", name, "--trc-layout", "spatial"]) == 0
    printed = capsys.readouterr().out
    assert "tensors loaded" in printed and f"wrote {out}" in printed
    rebuilt, info = load_model(out)
    assert info.source == "proscale" and info.report.ok
    assert to_dict(rebuilt.cfg) == to_dict(model.cfg)
    _same_state(model, rebuilt)
    _same_outputs(model, rebuilt)
    # and back to detectron2 naming, which reloads to the same weights
    back = tmp_path / "back.pkl"
    assert run_cli(["convert", str(out), "-o", str(back), "--to", "detectron2"]) == 0
    again = proscale.build_model(name).eval()
    load_checkpoint(again, back)
    _same_state(model, again)


def test_cli_convert_infers_config(tmp_path, capsys):
    model = _randomise(proscale.build_model("proscale_tiny_333"))
    src = _write_official(model, tmp_path / "official.pth")
    out = tmp_path / "model.safetensors"
    assert run_cli(["convert", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "encoder plan (3, 3, 3)" in printed and "official layout" in printed and "output lpe" in printed
    rebuilt, _ = load_model(out)
    enc = rebuilt.cfg.encoder
    assert (enc.plan, enc.trc, enc.trc_layout, enc.output, enc.d_model) == ((3, 3, 3), True, "official", "lpe", 64)
    assert rebuilt.cfg.backbone.freeze_bn  # detectron2 ResNets use FrozenBN
    # the weights fit exactly; heads are not in the weights (8 assumed), so only the tensors are compared
    a, b = to_detectron2(model.state_dict()), to_detectron2(rebuilt.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_convert_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"\x80\x04garbage")
    assert run_cli(["convert", str(bad), "-o", str(tmp_path / "x.pt")]) == 1
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


@pytest.fixture(scope="module")
def r50():
    return proscale.build_model("proscale_r50_333")


def test_r50_names_shapes_and_inference(r50):
    sd = r50.state_dict()
    official = to_detectron2(sd)
    assert official["backbone.stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert official["backbone.res2.0.conv2.weight"].shape == (64, 64, 3, 3)  # stride in the 3x3 conv
    assert official["backbone.res5.0.shortcut.weight"].shape == (2048, 1024, 1, 1)
    assert official["backbone.res4.5.conv3.norm.running_var"].shape == (1024,)
    assert "backbone.res4.6.conv1.weight" not in official
    pd = "sem_seg_head.pixel_decoder.transformer.encoder."
    assert [official[f"{pd}layers.{i}.self_attn.sampling_offsets.weight"].shape for i in (0, 3, 6)] == \
        [(64, 256), (128, 256), (192, 256)]
    assert official["sem_seg_head.pixel_decoder.input_proj.0.0.weight"].shape == (256, 2048, 1, 1)  # 0 is res5
    back = from_detectron2(official)
    assert back.keys() == sd.keys()  # FrozenBN: no step counters anywhere
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert to_dict(infer_config(official)) == to_dict(proscale.get_preset("proscale_r50_333"))
    report = load_checkpoint(r50, {"model": official})
    assert report.ok and report.loaded == len(sd)


def test_swin_mapping():
    model = proscale.build_model("m2f_swin_t")
    sd = model.state_dict()
    official = to_detectron2(sd)
    # the original Swin merges patches at the end of stages 0-2; timm at the start of stages 1-3
    assert official["backbone.layers.0.downsample.reduction.weight"].shape == (192, 384)
    assert torch.equal(official["backbone.layers.0.downsample.reduction.weight"],
                       sd["backbone.body.layers_1.downsample.reduction.weight"])
    assert not any(k.startswith("backbone.layers.3.downsample") for k in official)
    assert official["backbone.layers.2.blocks.5.attn.relative_position_index"].shape == (49, 49)
    # detectron2's per-stage output LayerNorms are ours: backbone.norm{i} <-> backbone.out_norms.{i}
    assert [official[f"backbone.norm{i}.weight"].shape[0] for i in range(4)] == [96, 192, 384, 768]
    back, ignored, unmapped = from_detectron2_report(official)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert len(ignored) == 12 and not unmapped  # the relative_position_index buffers
    assert to_dict(infer_config(official)) == to_dict(proscale.get_preset("m2f_swin_t"))
    # a Swin without output norms is told apart, and a file/model disagreement is named, never dropped
    bare = {k: v for k, v in official.items() if not k.startswith("backbone.norm")}
    assert infer_config(bare).backbone.out_norms is False
    with pytest.raises(CheckpointError, match=r"backbone\.out_norms\.0\.weight"):
        load_checkpoint(model, {"model": bare})
    report = load_checkpoint(model, {"model": bare}, strict=False)
    assert "backbone.out_norms.3.bias" in report.missing and "out_norms=false" in str(report)


def _official_swin_state(model, seed: int = 5) -> dict:
    """A detectron2 D2SwinTransformer-style state dict (Mask2Former Swin checkpoint) with every
    tensor random, as the official .pkl stores them: numpy arrays, relative_position_index buffers,
    patch merging at the end of stages 0-2 and the output norms backbone.norm0..3."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0)
                 if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    for i in range(4):  # output norms far from identity, so using them or not shows in the outputs
        state[f"backbone.out_norms.{i}.weight"] = torch.rand(state[f"backbone.out_norms.{i}.weight"].shape,
                                                             generator=g) + 0.5
        state[f"backbone.out_norms.{i}.bias"] = torch.randn(state[f"backbone.out_norms.{i}.bias"].shape, generator=g)
    return to_detectron2(state, numpy=True)


def test_official_swin_checkpoint_loads_strictly_and_uses_output_norms(tmp_path):
    """An official Mask2Former Swin .pkl (norm0..3 included) loads with no missing, unexpected or
    ignored-but-used key, and res2..res5 are the LayerNorm of timm's stage outputs."""
    official = _official_swin_state(proscale.build_model("m2f_swin_t"))
    assert {f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")} <= official.keys()
    path = tmp_path / "model_final_swin_t.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": official, "__author__": "detectron2"}, f)
    model, info = load_model(path)  # strict by default; the config is read from the keys
    assert info.report.ok and not info.report.unexpected and not info.report.missing
    assert info.config.backbone.out_norms and info.config.backbone.name == "swin_tiny_patch4_window7_224"
    assert all(k.endswith("relative_position_index") for k in info.report.ignored)
    backbone = model.backbone
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw = backbone.body(x)  # timm's stage outputs, (B, H, W, C)
        feats = backbone(x)
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        w, b = (torch.from_numpy(official[f"backbone.norm{i}.{p}"]) for p in ("weight", "bias"))
        expected = torch.nn.functional.layer_norm(raw[i], (raw[i].shape[-1],), w, b).permute(0, 3, 1, 2)
        assert feats[name].shape == expected.shape
        torch.testing.assert_close(feats[name], expected, rtol=0, atol=1e-5)
        assert (feats[name] - raw[i].permute(0, 3, 1, 2)).abs().max() > 0.1  # the norms do change the maps


# ------------------------------------------------------------------ config inference
@pytest.mark.parametrize("plan", [(3, 3, 3), (1, 1, 1), (2, 2, 2), (0, 0, 6), (0, 2, 2)])
def test_plan_inferred_from_official_widths(plan):
    pd = "sem_seg_head.pixel_decoder.transformer.encoder.layers"
    levels = [stage + 1 for stage, n in enumerate(plan) for _ in range(n)]
    state = {}
    for i, lv in enumerate(levels):
        state[f"{pd}.{i}.self_attn.sampling_offsets.weight"] = np.zeros((64 * lv, 256), np.float32)
        state[f"{pd}.{i}.self_attn.attention_weights.weight"] = np.zeros((32 * lv, 256), np.float32)
        state[f"{pd}.{i}.linear1.weight"] = np.zeros((1024, 256), np.float32)
    state["sem_seg_head.pixel_decoder.transformer.level_embed"] = np.zeros((3, 256), np.float32)
    state["sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.weight"] = np.zeros((1, 256, 1, 1),
                                                                                             np.float32)
    state["sem_seg_head.pixel_decoder.layer_1.norm.weight"] = np.zeros(256, np.float32)
    ours = from_detectron2(state)
    assert ours["pixel_decoder.encoder.trc.score.weight"].shape == (1, 256, 1, 1)  # the 1x1 conv is kept
    enc = infer_encoder(ours)
    assert (enc.plan, enc.n_heads, enc.n_points, enc.ffn_dim) == (plan, 8, 4, 1024)
    assert (enc.trc, enc.trc_temperature, enc.trc_layout, enc.output) == (True, 0.1, "official_conv", "lpe")


def test_plan_inference_rejects_non_progressive():
    state = {"pixel_decoder.level_embed": torch.zeros(3, 256), "pixel_decoder.encoder.layers.0.linear1.weight":
             torch.zeros(1024, 256)}
    for i, rows in enumerate((96, 32)):
        state[f"pixel_decoder.encoder.layers.{i}.self_attn.attention_weights.weight"] = torch.zeros(rows, 256)
    with pytest.raises(CheckpointError, match="progressive"):
        infer_encoder(state)


# ------------------------------------------------------------------ strict-load errors
@pytest.fixture(scope="module")
def target():
    """An m2f_tiny to load into (loads overwrite it or leave it unchanged)."""
    return proscale.build_model("m2f_tiny")


@pytest.fixture(scope="module")
def source():
    """A randomised m2f_tiny to take weights from (never loaded into)."""
    return _randomise(proscale.build_model("m2f_tiny"), seed=3)


@pytest.fixture
def official(source):
    return to_detectron2(source.state_dict())


def test_wrong_shape_names_the_key(target, official):
    key = "sem_seg_head.predictor.class_embed.weight"
    official[key] = torch.zeros(5, 64)
    model = target
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"transformer_decoder\.class_embed\.weight.*\(5, 64\).*\(9, 64\)"):
        load_checkpoint(model, {"model": official})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    report = load_checkpoint(model, {"model": official}, strict=False)
    assert report.mismatched == [("transformer_decoder.class_embed.weight", (5, 64), (9, 64))]


def test_missing_key_is_named(target, official):
    del official["sem_seg_head.pixel_decoder.mask_features.bias"]
    model = target
    with pytest.raises(CheckpointError, match=r"missing.*\n.*pixel_decoder\.mask_features\.bias"):
        load_checkpoint(model, {"model": official})
    report = load_checkpoint(model, {"model": official}, strict=False)
    assert report.missing == ["pixel_decoder.mask_features.bias"]


def test_unexpected_key_reported_and_training_keys_ignored(target, official):
    official["criterion.empty_weight"] = torch.ones(9)  # a loss constant in every Mask2Former checkpoint
    model = target
    assert load_checkpoint(model, {"model": official}).ignored == ["criterion.empty_weight"]
    official["sem_seg_head.pixel_decoder.extra.weight"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"sem_seg_head\.pixel_decoder\.extra\.weight"):
        load_checkpoint(model, {"model": official})
    report = load_checkpoint(model, {"model": official}, strict=False)
    assert report.unexpected == ["sem_seg_head.pixel_decoder.extra.weight"]
    assert "unexpected" in str(report)


def test_proscale_naming_and_backbone_only_pickle(tmp_path, source, target):
    model, other = source, target
    report = load_checkpoint(other, {"model": model.state_dict(), "config": to_dict(model.cfg)})
    assert report.source == "proscale" and report.ok
    # a backbone-only detectron2 pickle (e.g. R-50.pkl) has no "backbone." prefix
    official = to_detectron2(model.state_dict(), numpy=True)
    backbone = {k[len("backbone."):]: v for k, v in official.items() if k.startswith("backbone.")}
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": backbone, "__author__": "torchvision", "matching_heuristics": True}, f)
    fresh = target
    report = load_checkpoint(fresh, path, strict=False)
    assert report.source == "detectron2" and not report.unexpected and not report.mismatched
    assert all(k.startswith(("pixel_decoder.", "transformer_decoder.")) for k in report.missing)
    assert torch.equal(fresh.state_dict()["backbone.body.layer4.1.bn2.running_var"],
                       model.state_dict()["backbone.body.layer4.1.bn2.running_var"])


# ------------------------------------------------------------------ load_model: any file -> model
def test_load_model_from_detectron2_and_proscale_files(tmp_path):
    model = _randomise(proscale.build_model("proscale_tiny_333"))
    pkl = _write_official(model, tmp_path / "official.pkl")
    # no config in the file: read from the keys, TRC in the layout the released weights use
    loaded, info = load_model(pkl)
    assert (info.source, info.path, info.report.ok, info.metadata) == ("detectron2", str(pkl), True, None)
    assert loaded.cfg is info.config and info.config.encoder.trc_layout == "official" and not loaded.training
    # a preset replaces it (classes still from the weights); overrides apply last
    loaded, info = load_model(pkl, preset="m2f_tiny", overrides=["encoder.plan=3,3,3", "encoder.trc=true",
                                                                 "encoder.output=lpe", "encoder.n_heads=4",
                                                                 "encoder.trc_temperature=0.1"])
    assert info.config.num_classes == model.cfg.num_classes
    _same_outputs(model, loaded)  # the overrides rebuilt proscale_tiny_333 exactly
    assert to_dict(info.config) == to_dict(model.cfg)
    # a proscale checkpoint carries its config and class metadata
    meta = {"name": "toy", "categories": [{"id": i, "name": f"c{i}"} for i in range(model.cfg.num_classes)]}
    pt = save_model(loaded, tmp_path / "model.pt", extra={"metadata": meta, "train_config": {"seed": 3}})
    again, info = load_model(pt)
    assert (info.source, info.metadata, info.train_config) == ("proscale", meta, {"seed": 3})
    _same_state(model, again)
    # weights that do not fit: strict names the file and the keys, non-strict loads the rest
    fit = r"(.|\n)*class_embed\.weight: checkpoint \(9, 64\) vs model \(4, 64\)"
    with pytest.raises(CheckpointError, match=re.escape(str(pt)) + fit):
        load_model(pt, num_classes=3)
    partial, info = load_model(pt, num_classes=3, strict=False)
    assert [k for k, _, _ in info.report.mismatched] == ["transformer_decoder.class_embed.weight",
                                                         "transformer_decoder.class_embed.bias"]
    key = "pixel_decoder.level_embed"
    assert torch.equal(partial.state_dict()[key], model.state_dict()[key])


def test_load_model_names_the_file_it_cannot_read(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: no config.json")):
        load_model(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{folder}: no model.safetensors")):
        load_model(folder)
    odd = tmp_path / "odd.pt"
    torch.save({"model": {"some.layer.weight": torch.zeros(2)}}, odd)
    with pytest.raises(CheckpointError, match=re.escape(f"{odd}: cannot tell the naming")):
        load_model(odd)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(save_pretrained folder, the transformers model): a small random Mask2Former with
    transformers' timm ResNet-18 wrapper, 4 heads (not the 8 a guess from the weights would give)."""
    transformers = pytest.importorskip("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "timm_backbone is not a supported model"
    try:
        backbone = transformers.TimmBackboneConfig(backbone="resnet18", out_indices=[1, 2, 3, 4])
        config = transformers.Mask2FormerConfig(
            backbone_config=backbone, feature_size=32, hidden_dim=32, mask_feature_size=32, encoder_layers=1,
            decoder_layers=2, num_queries=5, dim_feedforward=64, encoder_feedforward_dim=64, num_attention_heads=4,
            id2label={0: "cat", 1: "dog", 2: "sky"})
        torch.manual_seed(0)
        hf = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return folder, hf


def test_load_model_reads_hf_folders_and_their_safetensors(hf_folder):
    from proscale.checkpoints.from_hf import load_hf_model

    folder, hf = hf_folder
    reference = load_hf_model(hf)  # from the transformers object in memory
    for path in (folder, folder / "model.safetensors"):
        model, info = load_model(path)
        assert info.source == "hf" and info.report.ok and info.report.ignored == ["criterion.empty_weight"]
        cfg = info.config  # from config.json (beside the .safetensors too): heads are not in the weights
        assert (cfg.num_classes, cfg.encoder.plan, cfg.encoder.n_heads, cfg.decoder.nheads) == (3, (0, 0, 1), 4, 4)
        assert [c["name"] for c in info.metadata["categories"]] == ["cat", "dog", "sky"]
        _same_state(reference, model)


def test_hf_names_load_into_a_built_model(hf_folder):
    folder, hf = hf_folder
    model, _ = load_model(folder)
    state = dict(hf.state_dict())
    state["model.pixel_level_module.something_else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected(.|\n)*model\.pixel_level_module\.something_else"):
        load_checkpoint(model, state)
    report = load_checkpoint(model, state, strict=False)
    assert report.source == "hf" and report.unexpected == ["model.pixel_level_module.something_else"]
    assert not report.missing and not report.mismatched


# ------------------------------------------------------------------ safety
class _Payload:
    """Unpickling this would run a shell command / create a file."""

    def __init__(self, marker, how):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return open, (self.marker, "w")


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".pt-legacy"])
def test_malicious_pickle_never_runs(tmp_path, suffix, how, target):
    marker = tmp_path / "pwned"
    payload = {"model": {"a": np.zeros(2, np.float32), "b": _Payload(marker, how)}}
    path = tmp_path / ("evil.pth" if suffix == ".pt-legacy" else f"evil{suffix}")
    if suffix == ".pkl":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=suffix == ".pth")
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        safe_load(path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(target, path)
    assert run_cli(["convert", str(path), "-o", str(tmp_path / "out.pt")]) == 1
    assert not marker.exists()
    # a plain pickle named .pth goes through the restricted unpickler too
    renamed = tmp_path / "evil_plain.pth"
    with open(renamed, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError):
        safe_load(renamed)
    assert not marker.exists()


def test_pickles_of_numpy_arrays_load_across_protocols(tmp_path):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(1.5), "i": np.arange(3)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": arrays}, f, protocol=protocol)
        out = safe_load(path)["model"]
        assert np.array_equal(out["w"], arrays["w"]) and out["s"] == 1.5 and out["i"].dtype == arrays["i"].dtype
    # numpy 1.x wrote numpy.core.multiarray; numpy 2 reads it as numpy._core
    data = pickle.dumps({"model": arrays}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    (tmp_path / "np1.pkl").write_bytes(data)
    assert np.array_equal(safe_load(tmp_path / "np1.pkl")["model"]["w"], arrays["w"])
    # torch files holding numpy arrays load with weights_only
    torch.save({"model": arrays}, tmp_path / "np.pth")
    assert np.array_equal(safe_load(tmp_path / "np.pth")["model"]["w"], arrays["w"])


def test_pickle_with_torch_tensors_is_refused(tmp_path):
    path = tmp_path / "t.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": torch.zeros(2)}}, f)
    with pytest.raises(UnsafeCheckpointError, match="torch"):
        safe_load(path)


@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".safetensors", ".pt"])
def test_truncated_file_is_corrupt_and_named(tmp_path, suffix, target):
    model = target
    path = tmp_path / f"model{suffix}"
    if suffix == ".pkl":
        _write_official(model, path)
    else:
        save_model(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        safe_load(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        safe_load(path)
    with pytest.raises(CheckpointError, match="no such"):
        safe_load(tmp_path / f"absent{suffix}")


# ------------------------------------------------------------------ atomic save
class _Boom:
    def __reduce__(self):
        raise RuntimeError("boom while serialising")


@pytest.mark.parametrize("name", ["state.pt", "state.pkl"])
def test_atomic_save_keeps_old_file_when_serialisation_fails(tmp_path, name):
    path = tmp_path / name
    atomic_save({"model": {"a": np.ones(3, np.float32)}, "step": 1}, path)
    old = path.read_bytes()
    big = {"model": {f"w{i}": np.ones(10000, np.float32) for i in range(20)}}  # some bytes first, then the failure
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({**big, "z": _Boom()}, path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp files left behind
    atomic_save({"step": 2}, path)
    assert safe_load(path)["step"] == 2


def test_atomic_save_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_save({"step": 1}, path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_model_round_trip(tmp_path, suffix):
    model = _randomise(proscale.build_model("proscale_tiny_333", overrides=["encoder.plan=1,2,1"]))
    path = save_model(model, tmp_path / f"m{suffix}")
    stored = safe_load(path)
    assert stored["proscale_version"] == proscale.__version__
    rebuilt, _ = load_model(path)
    assert rebuilt.cfg.encoder.plan == (1, 2, 1) and not rebuilt.training
    _same_state(model, rebuilt)
    if suffix == ".pt":
        _same_outputs(model, rebuilt)
