"""The plan-driven deformable encoder (proscale.models.encoder) and its pixel decoder.

(a) plan (0, 0, 6), TRC off, conv output *is* Mask2Former's pixel decoder;
(b) TRC's two layouts on hand-made tensors;
(c) stage mechanics: sequence lengths, levels per layer, empty stages, RESIDUAL, validation.
"""
import pytest
import torch
import torch.nn.functional as F

from proscale.config import EncoderConfig, apply_overrides
from proscale.models.encoder import DeformableEncoder, TokenRecalibration
from proscale.models.pixel_decoder import build_pixel_decoder
from proscale.presets import get_preset

CHANNELS = {
    "resnet18": {"res2": 64, "res3": 128, "res4": 256, "res5": 512},
    "resnet50": {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048},
}
SHAPES = ((2, 3), (4, 6), (8, 12))  # res5, res4, res3 of a 64x96 input
N5, N4, N3 = (h * w for h, w in SHAPES)
SMALL = dict(d_model=32, n_heads=4, n_points=2, ffn_dim=64)


def perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Moves every parameter off its (often zero or symmetric) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def features(channels: dict, size=(64, 96), seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    return {k: torch.randn(1, c, size[0] // strides[k], size[1] // strides[k], generator=g) for k, c in channels.items()}


def reference_points_by_hand(shapes) -> torch.Tensor:
    """(1, N, L, 2): ((j + 0.5) / W, (i + 0.5) / H) of each token, the same for every level."""
    rows = []
    for h, w in shapes:
        for i in range(h):
            for j in range(w):
                rows.append(((j + 0.5) / w, (i + 0.5) / h))
    return torch.tensor(rows)[None, :, None, :].expand(1, -1, len(shapes), 2)


def encoder_inputs(d: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(1, h * w, d, generator=g) for h, w in SHAPES]
    pos = [torch.randn(1, h * w, d, generator=g) for h, w in SHAPES]
    return tokens, pos


def record_layer_inputs(encoder: DeformableEncoder):
    """Hooks every layer; returns the list its inputs (x, pos, ref, shapes) are appended to."""
    seen = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args))
    return seen


# --------------------------------------------------------------------------------------------
# (a) equivalence with Mask2Former's pixel decoder
# --------------------------------------------------------------------------------------------

def baseline_pixel_decoder_by_hand(pd, feats):
    """Mask2Former's pixel decoder written out: all tokens, every layer over three levels."""
    srcs, pos, shapes = [], [], []
    for lvl, name in enumerate(("res5", "res4", "res3")):
        x = pd.input_proj[lvl](feats[name])
        shapes.append(tuple(x.shape[-2:]))
        srcs.append(x.flatten(2).transpose(1, 2))
        pos.append(pd.pe_layer(x).flatten(2).transpose(1, 2) + pd.level_embed[lvl])
    x, p = torch.cat(srcs, 1), torch.cat(pos, 1)
    ref = reference_points_by_hand(shapes)
    assert len(pd.encoder.layers) == 6
    for layer in pd.encoder.layers:
        x = layer(x, p, ref, tuple(shapes))
    maps, start = [], 0
    for h, w in shapes:
        maps.append(x[:, start:start + h * w].transpose(1, 2).reshape(1, -1, h, w))
        start += h * w
    # Channels-last as the module runs it: convolution rounding depends on the memory format.
    y = pd.adapter_1(feats["res2"].contiguous(memory_format=torch.channels_last))
    y = y + F.interpolate(maps[-1], size=y.shape[-2:], mode="bilinear", align_corners=False)
    return pd.mask_features(pd.layer_1(y)), maps


@pytest.mark.parametrize("baseline,proscale,backbone", [("m2f_tiny", "proscale_tiny_333", "resnet18"),
                                                         ("m2f_r50", "proscale_r50_333", "resnet50")])
def test_plan_006_without_trc_is_mask2former(baseline, proscale, backbone):
    channels = CHANNELS[backbone]
    base_cfg = get_preset(baseline)
    cfg = apply_overrides(get_preset(proscale), ["encoder.plan=0,0,6", "encoder.trc=false", "encoder.output=conv"])
    torch.manual_seed(0)
    base = build_pixel_decoder(channels, base_cfg.encoder, base_cfg.decoder.mask_dim).eval()
    perturb(base)
    model = build_pixel_decoder(channels, cfg.encoder, cfg.decoder.mask_dim).eval()
    model.load_state_dict(base.state_dict())  # strict: the same parameter names and shapes
    feats = features(channels)
    with torch.no_grad():
        mf_base, maps_base = base(feats)
        mf, maps = model(feats)
        mf_hand, maps_hand = baseline_pixel_decoder_by_hand(model, feats)
    assert mf.shape == (1, cfg.decoder.mask_dim, 16, 24)
    assert (mf - mf_base).abs().max() <= 1e-6
    assert (mf - mf_hand).abs().max() <= 1e-6
    for a, b, c in zip(maps, maps_base, maps_hand):
        assert a.shape == b.shape == c.shape
        assert (a - b).abs().max() <= 1e-6 and (a - c).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------
# (b) Token Re-Calibration
# --------------------------------------------------------------------------------------------

def trc_with_weight(weight, layout: str, temperature: float = 1.0, bias: float = 0.0) -> TokenRecalibration:
    trc = TokenRecalibration(len(weight), temperature, layout)
    with torch.no_grad():
        trc.score.weight.copy_(torch.tensor([weight], dtype=torch.float32))
        trc.score.bias.fill_(bias)
    return trc


def test_trc_official_layout_hand_example():
    # t3: 8 tokens (a 2x4 map) of 2 channels, token k = (2k, 2k+1): memory 0, 1, ..., 15.
    t3 = torch.arange(16, dtype=torch.float32).view(1, 8, 2)
    gated = torch.ones(1, 2, 2)  # a 1x2 map to gate
    # Official: raw view (1, 2, 2, 4) reads memory in order, so "channel 0" is the map
    # [[0, 1, 2, 3], [4, 5, 6, 7]] and "channel 1" is [[8..11], [12..15]]. Halving the size
    # (bilinear, align_corners=False, exactly 2x) averages 2x2 blocks: channel 0 -> [2.5, 4.5],
    # channel 1 -> [10.5, 12.5]; the raw reshape (1, 2, 2) gives tokens (2.5, 4.5), (10.5, 12.5).
    # Score = channel 0 of each: 2.5 and 10.5.
    out = trc_with_weight([1.0, 0.0], "official")(gated, (1, 2), t3, (2, 4))
    assert torch.allclose(out[0, :, 0], torch.sigmoid(torch.tensor([2.5, 10.5])))
    assert torch.allclose(out[0, :, 1], out[0, :, 0])  # one gate per token, broadcast over channels
    # Spatial: coarse token 0 covers fine tokens 0, 1, 4, 5 -> channel 0 mean(0, 2, 8, 10) = 5;
    # coarse token 1 covers 2, 3, 6, 7 -> mean(4, 6, 12, 14) = 9.
    out = trc_with_weight([1.0, 0.0], "spatial")(gated, (1, 2), t3, (2, 4))
    assert torch.allclose(out[0, :, 0], torch.sigmoid(torch.tensor([5.0, 9.0])))


@pytest.mark.parametrize("size", [(2, 3), (3, 5), (6, 10)])
def test_trc_layouts_against_explicit_construction(size):
    torch.manual_seed(0)
    B, C, size3 = 2, 8, (6, 10)
    t3 = torch.randn(B, size3[0] * size3[1], C)
    tokens = torch.randn(B, size[0] * size[1], C)
    official = TokenRecalibration(C, 0.1, "official")
    spatial = TokenRecalibration(C, 0.1, "spatial")
    spatial.load_state_dict(official.state_dict())
    w, b = official.score.weight, official.score.bias

    def gate(fine_tokens):
        return torch.sigmoid(0.1 * (fine_tokens @ w.t() + b))

    # Official: raw view to (B, C, H3, W3), resize, raw reshape back to (B, N, C).
    fine = F.interpolate(t3.view(B, C, *size3), size=size, mode="bilinear", align_corners=False)
    expected_official = tokens * gate(fine.reshape(B, size[0] * size[1], C))
    # Spatial: a transpose makes the real (B, C, H3, W3) map, and one brings it back.
    fine = F.interpolate(t3.transpose(1, 2).reshape(B, C, *size3), size=size, mode="bilinear", align_corners=False)
    expected_spatial = tokens * gate(fine.flatten(2).transpose(1, 2))
    with torch.no_grad():
        assert torch.allclose(official(tokens, size, t3, size3), expected_official, atol=1e-6)
        assert torch.allclose(spatial(tokens, size, t3, size3), expected_spatial, atol=1e-6)
        if size == size3:  # no resize: the raw view and reshape cancel, both layouts agree
            assert torch.allclose(expected_official, expected_spatial, atol=1e-6)
        else:
            assert not torch.allclose(expected_official, expected_spatial)


def test_trc_spatial_gate_follows_position():
    # Fine map 4x6 whose channel 0 is the row index and channel 1 the column index.
    h3, w3 = 4, 6
    rows, cols = torch.meshgrid(torch.arange(h3, dtype=torch.float32), torch.arange(w3, dtype=torch.float32),
                                indexing="ij")
    t3 = torch.stack((rows.reshape(-1), cols.reshape(-1)), -1)[None]  # (1, 24, 2)
    T = 0.5
    # Same size: the gate of token (i, j) is sigmoid(T * i) with the row-reading score.
    same = trc_with_weight([1.0, 0.0], "spatial", T)(torch.ones(1, 24, 2), (h3, w3), t3, (h3, w3))
    assert torch.allclose(same[0, :, 0], torch.sigmoid(T * rows.reshape(-1)))
    # Half size (2x3): block (i, j) averages rows 2i, 2i+1 -> 2i + 0.5, and columns 2j + 0.5.
    half_rows = trc_with_weight([1.0, 0.0], "spatial", T)(torch.ones(1, 6, 2), (2, 3), t3, (h3, w3))
    half_cols = trc_with_weight([0.0, 1.0], "spatial", T)(torch.ones(1, 6, 2), (2, 3), t3, (h3, w3))
    i, j = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    assert torch.allclose(half_rows[0, :, 0], torch.sigmoid(T * (2 * i + 0.5)).reshape(-1))
    assert torch.allclose(half_cols[0, :, 0], torch.sigmoid(T * (2 * j + 0.5)).reshape(-1))
    # The official layout mixes space and channels: its gates do not follow the rows.
    scrambled = trc_with_weight([1.0, 0.0], "official", T)(torch.ones(1, 6, 2), (2, 3), t3, (h3, w3))
    assert not torch.allclose(scrambled, half_rows)


def test_trc_layout_validation():
    with pytest.raises(ValueError, match="trc_layout"):
        TokenRecalibration(8, 1.0, "transposed")


@pytest.mark.parametrize("layout", ["spatial", "official"])
def test_trc_in_encoder_gates_res5_and_res4_only(layout):
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(1, 1, 1), trc=True, trc_temperature=0.1, trc_layout=layout, **SMALL)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    calls = []
    enc.trc.register_forward_hook(lambda mod, args, out: calls.append(out))
    seen = record_layer_inputs(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    t5, t4, t3 = tokens
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
        g5 = enc.trc(t5, SHAPES[0], t3, SHAPES[2])
        g4 = enc.trc(t4, SHAPES[1], t3, SHAPES[2])
    assert len(calls) == 4  # two in the forward (one shared module: res5, res4), two here
    assert torch.equal(seen[0][0], g5)  # stage 1 runs on TRC(t5)
    assert torch.equal(seen[1][0][:, N5:], g4)  # res4 joins gated
    assert torch.equal(seen[2][0][:, N5 + N4:], t3)  # res3 joins ungated
    assert y.shape == (1, N5 + N4 + N3, cfg.d_model)


# --------------------------------------------------------------------------------------------
# (c) stage mechanics
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan,lengths", [
    ((1, 0, 0), [N5]),
    ((0, 1, 0), [N5 + N4]),
    ((1, 1, 1), [N5, N5 + N4, N5 + N4 + N3]),
    ((2, 0, 1), [N5, N5, N5 + N4 + N3]),
    ((0, 2, 1), [N5 + N4] * 2 + [N5 + N4 + N3]),
    ((0, 0, 2), [N5 + N4 + N3] * 2),
])
def test_sequence_length_and_levels_per_layer(plan, lengths):
    cfg = EncoderConfig(plan=plan, **SMALL)
    enc = DeformableEncoder(cfg).eval()
    seen = record_layer_inputs(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
    assert [args[0].shape[1] for args in seen] == lengths
    for args, layer in zip(seen, enc.layers):
        x, p, ref, shapes = args
        levels = layer.self_attn.n_levels
        assert shapes == SHAPES[:levels] and sum(h * w for h, w in shapes) == x.shape[1]
        assert p.shape == x.shape and ref.shape == (1, x.shape[1], levels, 2)
        assert torch.equal(ref, reference_points_by_hand(shapes))
    assert enc.stage_levels() == [s + 1 for s, n in enumerate(plan) for _ in range(n)]
    assert y.shape == (1, N5 + N4 + N3, cfg.d_model)  # every token is in the output


def test_levels_of_the_released_layers():
    enc = DeformableEncoder(get_preset("proscale_r50_333").encoder)
    assert [layer.self_attn.sampling_offsets.out_features for layer in enc.layers] == [64] * 3 + [128] * 3 + [192] * 3
    assert [layer.self_attn.attention_weights.out_features for layer in enc.layers] == [32] * 3 + [64] * 3 + [96] * 3
    assert [layer.self_attn.n_levels for layer in enc.layers] == [1] * 3 + [2] * 3 + [3] * 3
    base = DeformableEncoder(get_preset("m2f_r50").encoder)
    assert [layer.self_attn.sampling_offsets.out_features for layer in base.layers] == [192] * 6
    assert base.trc is None and enc.trc is not None


@pytest.mark.parametrize("trc", [False, True])
def test_stage1_changes_only_res5(trc):
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(1, 0, 0), trc=trc, **SMALL)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    t5, t4, t3 = tokens
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
        g4 = enc.trc(t4, SHAPES[1], t3, SHAPES[2]) if trc else t4
    assert (y[:, :N5] - t5).abs().max() > 1e-3
    assert torch.equal(y[:, N5:N5 + N4], g4)
    assert torch.equal(y[:, N5 + N4:], t3)


def ref_of(levels):
    return reference_points_by_hand(SHAPES[:levels])


def test_empty_stage_does_nothing():
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(1, 0, 1), **SMALL)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
        x = enc.layers[0](tokens[0], pos[0], ref_of(1), SHAPES[:1])
        x = torch.cat((x, tokens[1], tokens[2]), 1)  # stage 2 has no layers: res4 just joins
        x = enc.layers[1](x, torch.cat(pos, 1), ref_of(3), SHAPES)
    assert (y - x).abs().max() <= 1e-6


def test_residual_adds_the_stage_input():
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(2, 1, 1), residual=True, **SMALL)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    L = enc.layers
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
        s1 = tokens[0]
        x = L[0](s1, pos[0], ref_of(1), SHAPES[:1]) + s1
        x = L[1](x, pos[0], ref_of(1), SHAPES[:1]) + s1
        s2 = torch.cat((x, tokens[1]), 1)
        x = L[2](s2, torch.cat(pos[:2], 1), ref_of(2), SHAPES[:2]) + s2
        x = L[3](torch.cat((x, tokens[2]), 1), torch.cat(pos, 1), ref_of(3), SHAPES)  # stage 3: none
        enc.cfg.residual = False
        y_plain = enc(tokens, pos, SHAPES)
    assert (y - x).abs().max() <= 1e-5
    assert (y - y_plain).abs().max() > 1e-3


@pytest.mark.parametrize("plan", [(0, 0, 0), (1, -1, 1), (1, 1), (1, 1, 1, 1)])
def test_plan_validation(plan):
    with pytest.raises(ValueError, match="plan"):
        DeformableEncoder(EncoderConfig(plan=plan, **SMALL))


def test_output_validation():
    cfg = EncoderConfig(output="fpn", **SMALL)
    with pytest.raises(ValueError, match="output"):
        build_pixel_decoder(CHANNELS["resnet18"], cfg, 32)
