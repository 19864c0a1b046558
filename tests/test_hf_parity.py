"""Output parity with Hugging Face transformers' Mask2Former (an independent implementation).

Random-weight `Mask2FormerForUniversalSegmentation` models (with transformers' timm ResNet
backbone wrapper) are converted by proscale.checkpoints.from_hf; in fp32 on CPU, eval mode, both
models must agree within TOL (per output, about twice the largest difference measured with either
MSDA back end) on (a) the multi-scale encoder maps, (b) the mask features, (c) the class logits
and (d) the mask logits of every prediction (final and auxiliary), given
  - the same backbone features (shapes from a /32 image, and odd shapes), and
  - the same images end to end (one size a multiple of 32, one not: transformers' own image
    processor pads to the size proscale pads to, and its output must equal proscale's).
Two configs: a small one (pixel decoder 64 channels, transformer decoder 48, mask features 32,
2 encoder / 3 decoder layers, 4 heads, 10 queries, ResNet-18 with BatchNorm) and
the standard one (256 channels, 6 encoder / 9 decoder layers, 100 queries, 8 heads, ResNet-50
with frozen BN, which is exactly the `m2f_r50` preset). Run with `-s` to see the measured diffs.
Also: PRO-SCALE's pixel decoder with the plan (0, 0, 6), TRC off and the conv output equals
transformers' Mask2Former pixel decoder (docs/method.md, "Equivalence with Mask2Former").
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import proscale  # noqa: E402
from proscale.checkpoints.from_hf import (  # noqa: E402
    UnmappedKeysError, config_from_hf, convert_hf_state_dict, load_hf_model, map_hf_state_dict,
)
from proscale.config import to_dict  # noqa: E402
from randomize import randomize_  # noqa: E402  (tests/randomize.py)

# Largest max-abs differences measured (fused / grid_sample MSDA, torch 2.14.1, transformers 5.24):
# encoder 4.2e-6 / 5.3e-6, mask features 1.8e-6, class logits 8.9e-7 (aux 1.2e-6), mask logits
# 4.4e-6 (aux 5.0e-6), preprocessing 2.4e-7, backbone 1.2e-6: the float32 rounding of two
# implementations that sum in different orders.
TOL = {"preprocess": 1e-6, "backbone": 5e-6, "encoder": 1e-5, "mask_features": 5e-6, "class_logits": 3e-6,
       "mask_logits": 1e-5, "aux_class": 3e-6, "aux_masks": 1e-5}
WRONG = 1e-2  # a conversion mistake moves the logits by at least this much (see the mutations)
RES = ("res2", "res3", "res4", "res5")
CONFIGS = {
    # Three different widths, so the decoder's input projections exist and every dimension is distinct.
    "small": dict(backbone="resnet18", freeze_bn=False, feature_size=64, hidden_dim=48, mask_feature_size=32,
                  encoder_layers=2, decoder_layers=4, num_queries=10, num_labels=5, dim_feedforward=96,
                  encoder_feedforward_dim=128, num_attention_heads=4),
    # transformers' defaults are the standard Mask2Former sizes (decoder_layers=10 -> 9 layers).
    "standard": dict(backbone="resnet50", freeze_bn=True, num_labels=133),
}
# Backbone feature shapes (res2, res3, res4, res5): from a 64x96 image, and odd ones (a 75x100
# image without /32 padding, ceil-halved) that exercise every resize and sampling edge.
FEATURE_SHAPES = {
    "from_64x96": ((16, 24), (8, 12), (4, 6), (2, 3)),
    "odd": ((19, 25), (10, 13), (5, 7), (3, 4)),
}
# Lists of image sizes for the end-to-end check; proscale pads both batches to /32.
IMAGE_SIZES = {
    "64x96": [(64, 96), (64, 96)],
    "72x100+64x90": [(72, 100), (64, 90)],  # not multiples of 32: padded to 96x128
}


def hf_config(name: str):
    kw = dict(CONFIGS[name])
    backbone = transformers.TimmBackboneConfig(backbone=kw.pop("backbone"), out_indices=[1, 2, 3, 4],
                                               freeze_batch_norm_2d=kw.pop("freeze_bn"))
    # transformers 5: the timm backbone is a TimmBackboneConfig; the v4 keywords
    # (use_timm_backbone=True, backbone="resnet50") now look the name up on the Hub.
    return transformers.Mask2FormerConfig(backbone_config=backbone, **kw)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(name, transformers model, proscale model carrying its converted weights), both in eval mode."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "timm_backbone is not a supported model" warning
    try:
        torch.manual_seed(0)
        hf = transformers.Mask2FormerForUniversalSegmentation(hf_config(request.param)).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    randomize_(hf, seed=1)
    ours = load_hf_model(hf).eval()  # strict: every key maps, every proscale weight is set
    return request.param, hf, ours


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def report(title: str, diffs: dict[str, float]) -> None:
    print(f"\n{title}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    bad = {k: f"{v:.2e} > {TOL[k]:.0e}" for k, v in diffs.items() if not v <= TOL[k]}
    assert not bad, f"{title}: differences above tolerance: {bad}"


_HF_REFERENCE: dict = {}


def hf_reference(name: str, hf, shapes: str, feats: list[torch.Tensor]) -> dict:
    """transformers' outputs for config `name` on `random_features(..., FEATURE_SHAPES[shapes])`, computed once."""
    key = (name, shapes)
    if key not in _HF_REFERENCE:
        _HF_REFERENCE[key] = hf_from_features(hf, feats)
    return _HF_REFERENCE[key]


@torch.no_grad()
def hf_from_features(hf, feats: list[torch.Tensor]) -> dict:
    pd = hf.model.pixel_level_module.decoder(feats)
    tm = hf.model.transformer_module(pd.multi_scale_features, pd.mask_features)
    logits = [hf.class_predictor(h.transpose(0, 1)) for h in tm.intermediate_hidden_states]
    return {"maps": pd.multi_scale_features, "mask_features": pd.mask_features, "pred_logits": logits,
            "pred_masks": list(tm.masks_queries_logits)}


@torch.no_grad()
def ours_from_features(ours, feats: list[torch.Tensor]) -> dict:
    named = dict(zip(RES, feats))
    maps = ours.pixel_decoder.forward_encoder(named)
    mask_features, maps_again = ours.pixel_decoder(named)
    out = ours.transformer_decoder(maps_again, mask_features)
    preds = out["aux_outputs"] + [out]
    return {"maps": maps, "mask_features": mask_features, "pred_logits": [p["pred_logits"] for p in preds],
            "pred_masks": [p["pred_masks"] for p in preds]}


def compare(a: dict, b: dict) -> dict[str, float]:
    assert len(a["pred_logits"]) == len(b["pred_logits"]) == len(a["pred_masks"]) == len(b["pred_masks"])
    return {
        "encoder": max(maxdiff(x, y) for x, y in zip(a["maps"], b["maps"])),
        "mask_features": maxdiff(a["mask_features"], b["mask_features"]),
        "class_logits": maxdiff(a["pred_logits"][-1], b["pred_logits"][-1]),
        "mask_logits": maxdiff(a["pred_masks"][-1], b["pred_masks"][-1]),
        "aux_class": max(maxdiff(x, y) for x, y in zip(a["pred_logits"][:-1], b["pred_logits"][:-1])),
        "aux_masks": max(maxdiff(x, y) for x, y in zip(a["pred_masks"][:-1], b["pred_masks"][:-1])),
    }


def random_features(ours, shapes, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = ours.backbone.out_channels
    return [torch.randn(2, channels[n], h, w, generator=g) for n, (h, w) in zip(RES, shapes)]


def test_config_from_hf(pair):
    name, hf, ours = pair
    cfg = config_from_hf(hf.config)
    assert cfg.num_classes == hf.config.num_labels == ours.num_classes
    assert cfg.decoder.dec_layers == hf.config.decoder_layers - 1 == len(hf.model.transformer_module.decoder.layers)
    assert config_from_hf(hf.config.to_dict()) == cfg  # config.json dicts work too
    if name == "standard":
        expected = proscale.get_preset("m2f_r50")
        expected.num_classes = 133
        assert to_dict(cfg) == to_dict(expected)


@pytest.mark.parametrize("shapes", list(FEATURE_SHAPES))
def test_parity_from_backbone_features(pair, shapes):
    name, hf, ours = pair
    feats = random_features(ours, FEATURE_SHAPES[shapes])
    report(f"{name} features {shapes}", compare(ours_from_features(ours, feats), hf_reference(name, hf, shapes, feats)))


@pytest.mark.parametrize("sizes", list(IMAGE_SIZES))
def test_parity_end_to_end(pair, sizes):
    name, hf, ours = pair
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in IMAGE_SIZES[sizes]]
    with torch.no_grad():
        x, _ = ours.preprocess(images)
        # transformers' own preprocessing (rescale, ImageNet mean/std, zero padding at the
        # bottom/right) to the /32 size proscale pads to; without pad_size it pads only to the
        # batch maximum, which is not a multiple of 32 and gives other backbone maps.
        processor = transformers.Mask2FormerImageProcessor(do_resize=False)
        inputs = processor(images=images, return_tensors="pt",
                           pad_size=transformers.image_utils.SizeDict(height=x.shape[-2], width=x.shape[-1]))
        pre = maxdiff(x, inputs["pixel_values"])
        ho = hf(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], output_hidden_states=True,
                output_auxiliary_logits=True)
        feats = ours.backbone(x)
        out = ours(images)
        ours_res = {"maps": ours.pixel_decoder.forward_encoder(feats), "mask_features": ours.pixel_decoder(feats)[0],
                    "pred_logits": [p["pred_logits"] for p in out["aux_outputs"] + [out]],
                    "pred_masks": [p["pred_masks"] for p in out["aux_outputs"] + [out]]}
    assert out["padded_size"] == tuple(x.shape[-2:]) and x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0
    aux = ho.auxiliary_logits
    hf_res = {"maps": ho.pixel_decoder_hidden_states, "mask_features": ho.pixel_decoder_last_hidden_state,
              "pred_logits": [a["class_queries_logits"] for a in aux] + [ho.class_queries_logits],
              "pred_masks": [a["masks_queries_logits"] for a in aux] + [ho.masks_queries_logits]}
    diffs = {"preprocess": pre, "backbone": max(maxdiff(feats[n], f) for n, f in zip(RES, ho.encoder_hidden_states))}
    diffs.update(compare(ours_res, hf_res))
    report(f"{name} images {sizes}", diffs)


def _swap_q_k(state: dict, key: str) -> None:
    w = state[key]
    d = w.shape[0] // 3
    state[key] = torch.cat([w[d:2 * d], w[:d], w[2 * d:]])


MUTATIONS = {
    # q and k stacked in the wrong order in nn.MultiheadAttention's in_proj
    "self_attn_q_k_swapped": lambda s: _swap_q_k(
        s, "transformer_decoder.transformer_self_attention_layers.0.self_attn.in_proj_weight"),
    # every sampling-offset bias of one encoder layer moved by 0.1 pixel
    "msda_offset_bias": lambda s: s["pixel_decoder.encoder.layers.1.self_attn.sampling_offsets.bias"].add_(0.1),
    # a level mix-up: res5's input-projection GroupNorm given res3's weights
    "input_proj_level_mixup": lambda s: s.update({
        "pixel_decoder.input_proj.0.1.weight": s["pixel_decoder.input_proj.2.1.weight"].clone()}),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("pair", ["small"], indirect=True)  # one config is enough
def test_a_wrong_weight_breaks_parity(pair, mutation):
    """The checks above would catch a conversion mistake: one wrong tensor -> far above TOL."""
    name, hf, ours = pair
    state = {k: v.clone() for k, v in convert_hf_state_dict(hf.state_dict()).items()}
    MUTATIONS[mutation](state)
    broken = copy.deepcopy(ours)
    broken.load_state_dict({k: v for k, v in state.items() if k in broken.state_dict()})
    feats = random_features(ours, FEATURE_SHAPES["odd"])
    diffs = compare(ours_from_features(broken, feats), hf_reference(name, hf, "odd", feats))
    assert max(diffs["class_logits"], diffs["mask_logits"]) > WRONG
    with pytest.raises(AssertionError, match="above"):
        report(f"mutation {mutation}", diffs)


@pytest.mark.parametrize("pair", ["small"], indirect=True)  # one config is enough
def test_unmapped_keys_are_reported(pair):
    name, hf, ours = pair
    state = dict(hf.state_dict())
    result = map_hf_state_dict(state)
    assert result.unmapped == [] and result.ignored == ["criterion.empty_weight"]
    assert set(result.state_dict) == set(ours.state_dict())  # every proscale weight comes from HF
    state["model.some_new_module.weight"] = torch.zeros(1)
    del state["model.transformer_module.decoder.layers.1.self_attn.k_proj.weight"]  # q and v cannot stack alone
    with pytest.raises(UnmappedKeysError) as err:
        convert_hf_state_dict(state)
    assert err.value.keys == sorted([
        "model.some_new_module.weight",
        "model.transformer_module.decoder.layers.1.self_attn.q_proj.weight",
        "model.transformer_module.decoder.layers.1.self_attn.v_proj.weight",
    ])
    partial = convert_hf_state_dict(state, strict=False)
    assert "transformer_decoder.transformer_self_attention_layers.1.self_attn.in_proj_weight" not in partial
    # A bare Mask2FormerModel state dict (no "model." prefix, no class head) converts as well.
    bare = map_hf_state_dict(hf.model.state_dict())
    assert bare.unmapped == [] and set(bare.state_dict) == set(result.state_dict) - {
        "transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias"}


@pytest.mark.parametrize("pair", ["small"], indirect=True)  # one config is enough
def test_load_hf_model_from_saved_folder(pair, tmp_path):
    name, hf, ours = pair
    hf.save_pretrained(tmp_path)
    processor = transformers.Mask2FormerImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    processor.save_pretrained(tmp_path)
    loaded = load_hf_model(tmp_path).eval()
    assert loaded.cfg.pixel_mean == pytest.approx((127.5,) * 3) and loaded.cfg.pixel_std == pytest.approx((63.75,) * 3)
    own = ours.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, own[key]), key


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="pre_norm"):
        config_from_hf(dict(hf_config("small").to_dict(), pre_norm=True))
    # transformers' own Swin maps to timm's (with the output norms): its default is the Swin-S layout
    cfg = config_from_hf(transformers.Mask2FormerConfig())
    assert (cfg.backbone.name, cfg.backbone.out_norms) == ("swin_small_patch4_window7_224", True)
    with pytest.raises(ValueError, match="Swin heads"):
        config_from_hf(transformers.Mask2FormerConfig(backbone_config=transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16], out_features=["stage1", "stage2", "stage3",
                                                                                      "stage4"])))
    with pytest.raises(ValueError, match="backbone type 'resnet'"):  # transformers' own ResNet: names do not map
        config_from_hf(transformers.Mask2FormerConfig(backbone_config=transformers.ResNetConfig(
            out_features=["stage1", "stage2", "stage3", "stage4"])))
    swin = proscale.config.BackboneConfig("swin_tiny_patch4_window7_224")
    cfg = config_from_hf(transformers.Mask2FormerConfig(), backbone=swin)
    assert cfg.backbone.name == "swin_tiny_patch4_window7_224" and cfg.decoder.dec_layers == 9


def test_proscale_plan_006_pixel_decoder_is_transformers_mask2former():
    """PRO-SCALE's tiny preset with plan (0, 0, 6), TRC off and the conv output, against
    transformers' Mask2FormerPixelDecoder of the same sizes: the converted weights fit it name for
    name (strict load) and the outputs agree."""
    from proscale.config import apply_overrides
    from proscale.models.pixel_decoder import build_pixel_decoder

    cfg = apply_overrides(proscale.get_preset("proscale_tiny_333"),
                          ["encoder.plan=0,0,6", "encoder.trc=false", "encoder.output=conv"])
    enc = cfg.encoder
    channels = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}  # ResNet-18
    hf_cfg = transformers.Mask2FormerConfig(feature_size=enc.d_model, mask_feature_size=cfg.decoder.mask_dim,
                                            encoder_layers=sum(enc.plan), encoder_feedforward_dim=enc.ffn_dim,
                                            num_attention_heads=enc.n_heads)
    modeling = transformers.models.mask2former.modeling_mask2former
    torch.manual_seed(0)
    hf_pd = modeling.Mask2FormerPixelDecoder(hf_cfg, feature_channels=[channels[n] for n in RES]).eval()
    torch.nn.init.normal_(hf_pd.level_embed)  # left uninitialised outside a full model's post_init
    randomize_(hf_pd, seed=4)
    converted = map_hf_state_dict({"model.pixel_level_module.decoder." + k: v for k, v in hf_pd.state_dict().items()})
    assert converted.unmapped == []
    ours = build_pixel_decoder(channels, enc, cfg.decoder.mask_dim).eval()
    ours.load_state_dict({k.removeprefix("pixel_decoder."): v for k, v in converted.state_dict.items()})
    g = torch.Generator().manual_seed(5)
    for shapes in FEATURE_SHAPES.values():
        feats = [torch.randn(2, channels[n], h, w, generator=g) for n, (h, w) in zip(RES, shapes)]
        with torch.no_grad():
            expected = hf_pd(feats)
            mask_features, maps = ours(dict(zip(RES, feats)))
        diffs = {"encoder": max(maxdiff(a, b) for a, b in zip(maps, expected.multi_scale_features)),
                 "mask_features": maxdiff(mask_features, expected.mask_features)}
        report(f"plan (0, 0, 6) pixel decoder {shapes}", diffs)
