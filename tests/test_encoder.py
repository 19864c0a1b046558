"""The plan-driven deformable encoder (proscale.models.encoder).

(a) against an independent, naive PRO-SCALE encoder written here from docs/method.md (loops
    over tokens, heads, levels and points with explicit bilinear interpolation; its own TRC,
    resize and stage logic; it only takes the module's weights by name), including plan
    (0, 0, 6) without TRC against the plain Mask2Former stage logic;
(b) TRC's three layouts on hand-made tensors;
(c) stage mechanics: sequence lengths, levels per layer, empty stages, RESIDUAL, validation.
The whole pixel decoder with plan (0, 0, 6) is checked against transformers' Mask2Former in
tests/test_hf_parity.py.
"""
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from proscale.checkpoints.from_detectron2 import from_detectron2, infer_encoder, to_detectron2
from proscale.config import EncoderConfig
from proscale.models.encoder import DeformableEncoder, TokenRecalibration
from proscale.models.pixel_decoder import build_pixel_decoder
from proscale.presets import get_preset

SHAPES = ((2, 3), (4, 6), (8, 12))  # res5, res4, res3 of a 64x96 input
N5, N4, N3 = (h * w for h, w in SHAPES)
SMALL = dict(d_model=32, n_heads=4, n_points=2, ffn_dim=64)
NAIVE = dict(d_model=16, n_heads=2, n_points=2, ffn_dim=24)  # sizes the Python loops handle quickly


def perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Moves every parameter off its (often zero or symmetric) initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def reference_points_by_hand(shapes) -> torch.Tensor:
    """(1, N, L, 2): ((j + 0.5) / W, (i + 0.5) / H) of each token, the same for every level."""
    rows = []
    for h, w in shapes:
        for i in range(h):
            for j in range(w):
                rows.append(((j + 0.5) / w, (i + 0.5) / h))
    return torch.tensor(rows)[None, :, None, :].expand(1, -1, len(shapes), 2)


def encoder_inputs(d: int, seed: int = 2, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(batch, h * w, d, generator=g) for h, w in SHAPES]
    pos = [torch.randn(batch, h * w, d, generator=g) for h, w in SHAPES]
    return tokens, pos


def record_layer_inputs(encoder: DeformableEncoder):
    """Hooks every layer; returns the list its inputs (x, pos, ref, shapes) are appended to."""
    seen = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args))
    return seen


# --------------------------------------------------------------------------------------------
# (a) a naive reference encoder, from docs/method.md. One image at a time, float64; `sd` is the
# module's state dict (weights taken by name only).
# --------------------------------------------------------------------------------------------
CORNERS = Counter()  # bilinear corners read inside / outside the maps (zero padding)


def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(x, sd, name, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def bilinear(rows, h, w, x, y):
    """Value at normalised (x, y) of a map stored as h*w row-major rows (D,); pixel centres at
    ((j + 0.5) / w, (i + 0.5) / h); corners outside the map count as zero."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros_like(rows[0])
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * rows[yy * w + xx]
                CORNERS["inside"] += 1
            else:
                CORNERS["outside"] += 1
    return out


def naive_msda(sd, prefix, query, value, shapes, n_heads, n_points):
    """query (N, C) with position added, value (N, C): the same N tokens of `shapes`' levels."""
    n, c = query.shape
    d, n_levels = c // n_heads, len(shapes)
    v = linear(value, sd, prefix + "value_proj")
    offsets = linear(query, sd, prefix + "sampling_offsets").view(n, n_heads, n_levels, n_points, 2).tolist()
    logits = linear(query, sd, prefix + "attention_weights").view(n, n_heads, n_levels * n_points)
    weights = torch.exp(logits - logits.max(-1, keepdim=True).values)
    weights = (weights / weights.sum(-1, keepdim=True)).view(n, n_heads, n_levels, n_points).tolist()
    refs = [((j + 0.5) / w, (i + 0.5) / h) for h, w in shapes for i in range(h) for j in range(w)]
    starts = [sum(h * w for h, w in shapes[:lv]) for lv in range(n_levels)]
    levels = [[v[starts[lv] + t, m * d:(m + 1) * d] for t in range(h * w)]
              for m in range(n_heads) for lv, (h, w) in enumerate(shapes)]
    out = torch.zeros(n, c, dtype=v.dtype)
    for q in range(n):
        rx, ry = refs[q]
        for m in range(n_heads):
            for lv, (h, w) in enumerate(shapes):
                for k in range(n_points):
                    dx, dy = offsets[q][m][lv][k]
                    sample = bilinear(levels[m * n_levels + lv], h, w, rx + dx / w, ry + dy / h)
                    out[q, m * d:(m + 1) * d] += weights[q][m][lv][k] * sample
    return linear(out, sd, prefix + "output_proj")


def naive_layer(sd, i, x, pos, shapes, cfg):
    p = f"layers.{i}."
    x = layer_norm(x + naive_msda(sd, p + "self_attn.", x + pos, x, shapes, cfg.n_heads, cfg.n_points), sd, p + "norm1")
    ffn = linear(linear(x, sd, p + "linear1").clamp(min=0), sd, p + "linear2")
    return layer_norm(x + ffn, sd, p + "norm2")


def naive_resize(img, h, w):
    """(C, H, W) -> (C, h, w): bilinear with half-pixel centres, source positions below 0
    clamped to 0 and the last row / column repeated (align_corners=False)."""
    def taps(n_in, n_out):
        out = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(src), n_in - 1)
            out.append(((i0, 1 - (src - i0)), (min(i0 + 1, n_in - 1), src - i0)))
        return out

    res = torch.zeros(img.shape[0], h, w, dtype=img.dtype)
    for i, rows in enumerate(taps(img.shape[1], h)):
        for j, cols in enumerate(taps(img.shape[2], w)):
            for yy, wy in rows:
                for xx, wx in cols:
                    res[:, i, j] += wy * wx * img[:, yy, xx]
    return res


def naive_trc(sd, tokens, size, t3, size3, layout, temperature):
    """tokens (h*w, C) gated by scores from t3 (H3*W3, C) (docs/method.md, TRC and its layouts)."""
    (h, w), (h3, w3) = size, size3
    c = t3.shape[1]
    memory = t3.reshape(-1)  # the (N3, C) token matrix in memory order
    fine = torch.zeros(c, h3, w3, dtype=t3.dtype)
    for ch in range(c):
        for y in range(h3):
            for x in range(w3):
                if layout == "spatial":  # the true map: channel ch of token (y, x)
                    fine[ch, y, x] = t3[y * w3 + x, ch]
                else:  # the raw view: memory entry ch*H3*W3 + y*W3 + x
                    fine[ch, y, x] = memory[ch * h3 * w3 + y * w3 + x]
    small = naive_resize(fine, h, w)
    small_memory = small.reshape(-1)
    weight, bias = sd["trc.score.weight"].reshape(-1), sd["trc.score.bias"]
    gates = []
    for t in range(h * w):
        y, x = divmod(t, w)
        if layout == "official":  # a raw reshape to rows: C consecutive memory entries
            feature = small_memory[t * c:(t + 1) * c]
        else:  # "spatial" and "official_conv": the channel column at map position (y, x)
            feature = small[:, y, x]
        gates.append(torch.sigmoid(temperature * (feature @ weight + bias)))
    return tokens * torch.stack(gates).view(-1, 1)


def naive_proscale_encoder(sd, cfg, tokens, pos, shapes):
    """The stage logic of docs/method.md ("PRO-SCALE: stages and the layer plan", RESIDUAL)."""
    outputs = []
    for b in range(tokens[0].shape[0]):
        t = [x[b].double() for x in tokens]
        p = [x[b].double() for x in pos]
        joined = list(t)
        n_levels = len(shapes)
        if cfg.trc:  # every level but the finest, scored from the finest
            for lv in range(n_levels - 1):
                joined[lv] = naive_trc(sd, t[lv], shapes[lv], t[-1], shapes[-1], cfg.trc_layout, cfg.trc_temperature)
        x, i = None, 0
        for stage, n_layers in enumerate(cfg.plan):
            x = joined[0] if x is None else torch.cat((x, joined[stage]))
            levels = stage + 1
            for _ in range(n_layers):
                x = naive_layer(sd, i, x, torch.cat(p[:levels]), shapes[:levels], cfg)
                i += 1
                if cfg.residual and stage < n_levels - 1:
                    x = x + torch.cat(joined[:levels])
        outputs.append(x)
    return torch.stack(outputs)


def naive_mask2former_encoder(sd, cfg, tokens, pos, shapes):
    """Mask2Former's encoder: every token from the start, every layer over all three levels."""
    outputs = []
    for b in range(tokens[0].shape[0]):
        x = torch.cat([t[b] for t in tokens]).double()
        p = torch.cat([q[b] for q in pos]).double()
        for i in range(cfg.plan[2]):
            x = naive_layer(sd, i, x, p, shapes, cfg)
        outputs.append(x)
    return torch.stack(outputs)


def encoder_and_weights(cfg, seed=0):
    torch.manual_seed(seed)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc, std=0.1, seed=seed)
    return enc, {k: v.double() for k, v in enc.state_dict().items()}


@pytest.mark.parametrize("layout", ["spatial", "official", "official_conv"])
@pytest.mark.parametrize("plan", [(1, 1, 1), (3, 3, 3), (2, 0, 4)])
def test_encoder_equals_naive_reference(plan, layout):
    cfg = EncoderConfig(plan=plan, trc=True, trc_temperature=0.5, trc_layout=layout, residual=True, **NAIVE)
    enc, sd = encoder_and_weights(cfg)
    tokens, pos = encoder_inputs(cfg.d_model, batch=2)
    CORNERS.clear()
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
    expected = naive_proscale_encoder(sd, cfg, tokens, pos, SHAPES)
    assert y.shape == expected.shape == (2, N5 + N4 + N3, cfg.d_model)
    assert (y.double() - expected).abs().max() <= 1e-5
    assert CORNERS["inside"] > 0 and CORNERS["outside"] > 0  # zero padding was exercised
    if plan != (1, 1, 1):
        return
    # The reference is sensitive to what it checks: without RESIDUAL, or with another TRC
    # layout, it gives other outputs.
    for change in (dict(residual=False), dict(trc_layout="spatial" if layout != "spatial" else "official")):
        other = EncoderConfig(**{**vars(cfg), **change})
        assert (naive_proscale_encoder(sd, other, tokens, pos, SHAPES) - expected).abs().max() > 1e-3


SHAPES4 = ((1, 2), (2, 3), (4, 6), (8, 12))  # Deformable DETR's strides 64, 32, 16, 8 of a 64x96 input


@pytest.mark.parametrize("plan", [(1, 1, 1, 1), (0, 2, 0, 2), (0, 0, 0, 3)])
def test_four_level_encoder_equals_naive_reference(plan):
    """The same stage logic with L = 4 levels (Deformable DETR): TRC scores the finest level and
    gates the three coarser ones as they join; (0, 0, 0, 3) without TRC is the plain encoder."""
    trc = plan != (0, 0, 0, 3)
    cfg = EncoderConfig(plan=plan, trc=trc, trc_temperature=0.5, residual=trc, **NAIVE)
    enc, sd = encoder_and_weights(cfg)
    g = torch.Generator().manual_seed(5)
    tokens = [torch.randn(2, h * w, cfg.d_model, generator=g) for h, w in SHAPES4]
    pos = [torch.randn(2, h * w, cfg.d_model, generator=g) for h, w in SHAPES4]
    assert enc.num_levels == 4 and enc.stage_levels() == [s + 1 for s, n in enumerate(plan) for _ in range(n)]
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES4)
    expected = naive_proscale_encoder(sd, cfg, tokens, pos, SHAPES4)
    assert y.shape == (2, sum(h * w for h, w in SHAPES4), cfg.d_model)
    assert (y.double() - expected).abs().max() <= 1e-5
    if trc:  # the reference notices a TRC that skips a level
        other = EncoderConfig(**{**vars(cfg), "trc": False})
        assert (naive_proscale_encoder(sd, other, tokens, pos, SHAPES4) - expected).abs().max() > 1e-3


def test_padding_mask_and_valid_ratios():
    """Deformable DETR's inputs: with nothing padded (valid ratios 1) the encoder is unchanged;
    reference points follow the valid part of each level; padded tokens are never read."""
    from proscale.models.encoder import masked_reference_points

    cfg = EncoderConfig(plan=(1, 1, 1, 1), trc=True, **SMALL)
    enc, _ = encoder_and_weights(cfg, seed=2)
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randn(2, h * w, cfg.d_model, generator=g) for h, w in SHAPES4]
    pos = [torch.randn(2, h * w, cfg.d_model, generator=g) for h, w in SHAPES4]
    n = sum(h * w for h, w in SHAPES4)
    with torch.no_grad():
        plain = enc(tokens, pos, SHAPES4)
        same = enc(tokens, pos, SHAPES4, padding_mask=torch.zeros(2, n, dtype=torch.bool),
                   valid_ratios=torch.ones(2, 4, 2))
    assert (plain - same).abs().max() <= 1e-6
    # Level 0 of shape (1, 2) and level 1 of (2, 3), the image covering (width, height) fractions
    # (0.5, 1) and (2/3, 0.5): token (0, 0) of level 1 sits at ((0.5 / (2/3 * 3)), 0.5 / (0.5 * 2))
    # in image coordinates, then scaled into each level's valid part.
    ratios = torch.tensor([[[0.5, 1.0], [2 / 3, 0.5]]])
    ref = masked_reference_points(((1, 2), (2, 3)), ratios)
    assert ref.shape == (1, 2 + 6, 2, 2)
    x, y = 0.5 / 2, 0.5 / 1
    assert torch.allclose(ref[0, 2, 0], torch.tensor([x * 0.5, y * 1.0]))
    assert torch.allclose(ref[0, 2, 1], torch.tensor([x * 2 / 3, y * 0.5]))
    # Without TRC (which scores the whole finest map), what padded tokens hold never reaches the
    # others: their values are zeroed wherever they would be sampled.
    enc, _ = encoder_and_weights(EncoderConfig(plan=(1, 1, 1, 1), **SMALL), seed=3)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, -10:] = True
    changed = [t.clone() for t in tokens]
    changed[-1][1, -10:] += 100.0
    with torch.no_grad():
        a = enc(tokens, pos, SHAPES4, padding_mask=mask, valid_ratios=torch.ones(2, 4, 2))
        b = enc(changed, pos, SHAPES4, padding_mask=mask, valid_ratios=torch.ones(2, 4, 2))
        c = enc(changed, pos, SHAPES4)  # without the mask they are read
    assert (a[:, :-10] - b[:, :-10]).abs().max() <= 1e-5 and torch.equal(a[0], b[0])
    assert (a[1, :-10] - c[1, :-10]).abs().max() > 1e-2


def test_encoder_rejects_a_level_count_other_than_its_plan():
    enc = DeformableEncoder(EncoderConfig(plan=(1, 1, 1, 1), **SMALL))
    tokens, pos = encoder_inputs(SMALL["d_model"])  # three levels
    with pytest.raises(ValueError, match="4 levels"):
        enc(tokens, pos, SHAPES)


def test_plan_006_without_trc_equals_naive_mask2former():
    cfg = EncoderConfig(plan=(0, 0, 6), **NAIVE)
    enc, sd = encoder_and_weights(cfg, seed=1)
    tokens, pos = encoder_inputs(cfg.d_model, seed=3)
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
    assert (y.double() - naive_mask2former_encoder(sd, cfg, tokens, pos, SHAPES)).abs().max() <= 1e-5


def test_naive_resize_is_bilinear_half_pixel():
    # Not F.interpolate's code: its rule, checked on values a hand can follow. 1x4 -> 1x2
    # averages pairs; 1x2 -> 1x4 puts samples at 0.25 / 0.75 of a pixel, clamped at the edges.
    row = torch.tensor([[[0.0, 2.0, 4.0, 8.0]]], dtype=torch.float64)
    assert naive_resize(row, 1, 2).flatten().tolist() == [1.0, 6.0]
    up = naive_resize(torch.tensor([[[0.0, 4.0]]], dtype=torch.float64), 1, 4)
    assert up.flatten().tolist() == [0.0, 1.0, 3.0, 4.0]


# --------------------------------------------------------------------------------------------
# (b) Token Re-Calibration
# --------------------------------------------------------------------------------------------

def trc_with_weight(weight, layout: str, temperature: float = 1.0, bias: float = 0.0) -> TokenRecalibration:
    trc = TokenRecalibration(len(weight), temperature, layout)
    with torch.no_grad():
        trc.score.weight.copy_(torch.tensor([weight], dtype=torch.float32).view_as(trc.score.weight))
        trc.score.bias.fill_(bias)
    return trc


def test_trc_layouts_hand_example():
    # t3: 8 tokens (a 2x4 map) of 2 channels, token k = (2k, 2k+1): memory 0, 1, ..., 15.
    t3 = torch.arange(16, dtype=torch.float32).view(1, 8, 2)
    gated = torch.ones(1, 2, 2)  # a 1x2 map to gate
    # Raw view (1, 2, 2, 4) reads memory in order, so "channel 0" is the map [[0, 1, 2, 3],
    # [4, 5, 6, 7]] and "channel 1" is [[8..11], [12..15]]. Halving the size (bilinear,
    # align_corners=False, exactly 2x) averages 2x2 blocks: channel 0 -> [2.5, 4.5],
    # channel 1 -> [10.5, 12.5].
    # Official: the raw reshape (1, 2, 2) gives rows (2.5, 4.5), (10.5, 12.5); score = entry 0.
    out = trc_with_weight([1.0, 0.0], "official")(gated, (1, 2), t3, (2, 4))
    assert torch.allclose(out[0, :, 0], torch.sigmoid(torch.tensor([2.5, 10.5])))
    assert torch.allclose(out[0, :, 1], out[0, :, 0])  # one gate per token, broadcast over channels
    # Official conv: the 1x1 conv reads channel 0 at each map position: 2.5, 4.5.
    conv = trc_with_weight([1.0, 0.0], "official_conv")
    assert conv.score.weight.shape == (1, 2, 1, 1)
    assert torch.allclose(conv(gated, (1, 2), t3, (2, 4))[0, :, 0], torch.sigmoid(torch.tensor([2.5, 4.5])))
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
    trcs = {layout: TokenRecalibration(C, 0.1, layout) for layout in ("official", "spatial", "official_conv")}
    trcs["spatial"].load_state_dict(trcs["official"].state_dict())
    w, b = trcs["official"].score.weight, trcs["official"].score.bias
    with torch.no_grad():
        trcs["official_conv"].score.weight.copy_(w.view(1, C, 1, 1))
        trcs["official_conv"].score.bias.copy_(b)

    def gate(scores):
        return torch.sigmoid(0.1 * scores)

    raw = F.interpolate(t3.view(B, C, *size3), size=size, mode="bilinear", align_corners=False)
    real = F.interpolate(t3.transpose(1, 2).reshape(B, C, *size3), size=size, mode="bilinear", align_corners=False)
    expected = {
        # raw view in, raw reshape to (B, N, C) rows out, Linear on the rows
        "official": tokens * gate(raw.reshape(B, -1, C) @ w.t() + b),
        # raw view in, 1x1 conv on the map, its (B, 1, h, w) output flattened in row-major order
        "official_conv": tokens * gate(F.conv2d(raw, w.view(1, C, 1, 1), b).view(B, -1, 1)),
        # the true map in and out, Linear on each position's channels
        "spatial": tokens * gate(real.flatten(2).transpose(1, 2) @ w.t() + b),
    }
    with torch.no_grad():
        for layout, trc in trcs.items():
            assert torch.allclose(trc(tokens, size, t3, size3), expected[layout], atol=1e-6), layout
    if size == size3:  # no resize: the raw view and reshape cancel, "official" is "spatial"
        assert torch.allclose(expected["official"], expected["spatial"], atol=1e-6)
    else:
        assert not torch.allclose(expected["official"], expected["spatial"])
    assert not torch.allclose(expected["official_conv"], expected["official"])  # other grouping


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
    # The official layouts mix space and channels: their gates do not follow the rows.
    for layout in ("official", "official_conv"):
        scrambled = trc_with_weight([1.0, 0.0], layout, T)(torch.ones(1, 6, 2), (2, 3), t3, (h3, w3))
        assert not torch.allclose(scrambled, half_rows)


@pytest.mark.parametrize("layout", ["official", "official_conv"])
def test_converted_trc_weight_picks_its_layout(layout):
    """The authors' checkpoints hold a Linear (1, C) or a 1x1 conv (1, C, 1, 1) TRC weight:
    conversion must pick the layout that gates as that op did, whatever the caller assumed."""
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(1, 1, 1), trc=True, trc_temperature=0.1, trc_layout=layout, d_model=32,
                        n_heads=8, n_points=4, ffn_dim=64)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    ours = {f"pixel_decoder.encoder.{k}": v for k, v in enc.state_dict().items()}
    ours["pixel_decoder.level_embed"] = torch.zeros(3, cfg.d_model)
    official = to_detectron2(ours)
    weight = official["sem_seg_head.pixel_decoder.transformer.encoder.token_excite.ops.weight"]
    assert weight.shape == ((1, 32, 1, 1) if layout == "official_conv" else (1, 32))
    converted = from_detectron2(official)
    assert converted["pixel_decoder.encoder.trc.score.weight"].shape == weight.shape  # kept as it is
    for asked in (None, "official", "official_conv"):
        assert infer_encoder(converted, trc_layout=asked).trc_layout == layout
    # A Linear weight also fits "spatial"; a conv weight fits nothing but "official_conv".
    expected = "spatial" if layout == "official" else "official_conv"
    assert infer_encoder(converted, trc_layout="spatial").trc_layout == expected
    inferred = infer_encoder(converted)
    assert (inferred.plan, inferred.trc, inferred.trc_temperature) == ((1, 1, 1), True, 0.1)
    rebuilt = DeformableEncoder(inferred).eval()
    prefix = "pixel_decoder.encoder."
    rebuilt.load_state_dict({k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)})
    tokens, pos = encoder_inputs(cfg.d_model)
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens, pos, SHAPES), enc(tokens, pos, SHAPES))


def test_trc_layout_validation():
    with pytest.raises(ValueError, match="trc_layout"):
        TokenRecalibration(8, 1.0, "transposed")


@pytest.mark.parametrize("layout", ["spatial", "official", "official_conv"])
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


def test_residual_adds_the_gated_input_tokens():
    """Stage 2 adds concat(TRC(t5), TRC(t4)) back, not the stage-1 output that entered it."""
    torch.manual_seed(0)
    cfg = EncoderConfig(plan=(2, 2, 1), trc=True, residual=True, **SMALL)
    enc = DeformableEncoder(cfg).eval()
    perturb(enc)
    tokens, pos = encoder_inputs(cfg.d_model)
    t5, t4, t3 = tokens
    L = enc.layers
    with torch.no_grad():
        y = enc(tokens, pos, SHAPES)
        g5, g4 = enc.trc(t5, SHAPES[0], t3, SHAPES[2]), enc.trc(t4, SHAPES[1], t3, SHAPES[2])
        x = L[0](g5, pos[0], ref_of(1), SHAPES[:1]) + g5
        x = L[1](x, pos[0], ref_of(1), SHAPES[:1]) + g5
        stage1_out = x
        x = torch.cat((x, g4), 1)
        gated = torch.cat((g5, g4), 1)
        x = L[2](x, torch.cat(pos[:2], 1), ref_of(2), SHAPES[:2]) + gated
        x = L[3](x, torch.cat(pos[:2], 1), ref_of(2), SHAPES[:2]) + gated
        x = L[4](torch.cat((x, t3), 1), torch.cat(pos, 1), ref_of(3), SHAPES)  # stage 3: none
        # What "add back the stage's input sequence" would give instead.
        s2 = torch.cat((stage1_out, g4), 1)
        z = L[2](s2, torch.cat(pos[:2], 1), ref_of(2), SHAPES[:2]) + s2
        z = L[3](z, torch.cat(pos[:2], 1), ref_of(2), SHAPES[:2]) + s2
        z = L[4](torch.cat((z, t3), 1), torch.cat(pos, 1), ref_of(3), SHAPES)
    assert (y - x).abs().max() <= 1e-5
    assert (y - z).abs().max() > 1e-3


@pytest.mark.parametrize("plan", [(0, 0, 0), (1, -1, 1), (), (0, 0, 0, 0)])
def test_plan_validation(plan):
    with pytest.raises(ValueError, match="plan"):
        DeformableEncoder(EncoderConfig(plan=plan, **SMALL))


@pytest.mark.parametrize("plan", [(1, 1), (1, 1, 1, 1)])
def test_pixel_decoder_needs_three_levels(plan):
    with pytest.raises(ValueError, match="3 levels"):
        build_pixel_decoder({"res2": 64, "res3": 128, "res4": 256, "res5": 512}, EncoderConfig(plan=plan, **SMALL), 32)


def test_output_validation():
    cfg = EncoderConfig(output="fpn", **SMALL)
    with pytest.raises(ValueError, match="output"):
        build_pixel_decoder({"res2": 64, "res3": 128, "res4": 256, "res5": 512}, cfg, 32)

