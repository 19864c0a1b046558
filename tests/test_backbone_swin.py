"""proscale's Swin backbone computes the original Swin (as Mask2Former's D2SwinTransformer does).

timm's Swin rolls a map before padding it to whole windows and never shifts a stage whose map at
224x224 fits one window (stage 4); the original pads first and shifts every second block
(proscale/models/swin.py). transformers' SwinBackbone (always_partition=True) is an independent
implementation of the original: with the same weights (mapped by proscale.checkpoints.hf_swin),
res2..res5 must agree to float32 rounding at sizes whose maps are not multiples of the window,
and timm's own order must not (so the test can tell them apart).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from proscale.checkpoints.hf_swin import ENC, swin_hf_config, swin_to_hf  # noqa: E402
from proscale.config import BackboneConfig  # noqa: E402
from proscale.models.backbone import build_backbone  # noqa: E402

TOL = 2e-5  # measured up to 4e-6 (res5)
SIZES = [(64, 96), (256, 320)]  # stage maps 16x24 .. 2x3 and 64x80 .. 8x10: none a multiple of 7


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = build_backbone(BackboneConfig("swin_tiny_patch4_window7_224", out_norms=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in ours.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.02)
    config = dict(swin_hf_config(ours.body))
    del config["model_type"]
    mapped, used = swin_to_hf({"backbone." + k: v for k, v in ours.state_dict().items()})
    assert used == {"backbone." + k for k in ours.state_dict()}  # every tensor has a transformers name
    hf = transformers.SwinBackbone(transformers.SwinConfig(**config)).eval()
    hf.load_state_dict({k.removeprefix(ENC): v for k, v in mapped.items()}, strict=True)
    return ours, hf


@pytest.mark.parametrize("size", SIZES)
def test_swin_backbone_equals_the_original_swin(pair, size):
    ours, hf = pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(x)
        b = hf(x).feature_maps
    diffs = [float((a[n] - m).abs().max()) for n, m in zip(("res2", "res3", "res4", "res5"), b)]
    print(f"\nSwin-T {size}: max abs difference res2..res5 " + ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= TOL, diffs


def test_timm_window_order_differs_from_the_original(pair):
    """The same weights in timm's own block order: stage 1 already differs (64x80 is not a
    multiple of 7), and stage 4 (8x10) is not shifted at all."""
    import timm

    ours, hf = pair
    plain = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, strict_img_size=False).eval()
    plain.load_state_dict(ours.body.state_dict())
    assert plain.layers_3.blocks[1].shift_size == (0, 0) and ours.body.layers_3.blocks[1].shift_size == (3, 3)
    x = torch.randn(1, 3, 256, 320, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps = [ours.out_norms[i](f).permute(0, 3, 1, 2) for i, f in enumerate(plain(x))]
        reference = hf(x).feature_maps
    assert all(float((m - r).abs().max()) > 1e-2 for m, r in zip(maps, reference))
