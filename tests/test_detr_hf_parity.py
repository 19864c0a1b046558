"""Output parity of proscale's Deformable DETR with Hugging Face transformers'
`DeformableDetrForObjectDetection` (an independent implementation), and the key maps of the HF
and original (fundamentalvision/Deformable-DETR) checkpoints.

Random-weight transformers models (timm ResNet-18 backbone, frozen BN, 64 channels, 4 heads,
2 encoder / 3 decoder layers, 4 levels), every weight moved off its init, are converted by
proscale.checkpoints.from_ddetr. Two configs: plain, and two-stage + iterative box refinement.
In fp32 on CPU, eval mode, the class logits, boxes, every auxiliary prediction and (two-stage)
the encoder proposals' logits and boxes must agree within TOL = 1e-4, on a batch of two
same-size images and on a padded batch (two sizes, transformers given the same pixel mask).
Run with `-s` to see the measured differences.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from proscale.checkpoints.errors import CheckpointError  # noqa: E402
from proscale.checkpoints.from_ddetr import (  # noqa: E402
    config_from_hf_detr, convert_ddetr_state_dict, detect_naming, load_ddetr_model,
)
from proscale.models.detr.heads import box_from_reference  # noqa: E402
from proscale.models.image_batch import padding_mask  # noqa: E402

TOL = 1e-4
CONFIGS = {
    "plain": dict(with_box_refine=False, two_stage=False),
    "twostage_refine": dict(with_box_refine=True, two_stage=True),
}
BATCHES = {"same_size": [(96, 128), (96, 128)], "padded": [(96, 128), (70, 90)]}


def hf_config(name: str):
    backbone = transformers.TimmBackboneConfig(backbone="resnet18", out_indices=[2, 3, 4], freeze_batch_norm_2d=True)
    return transformers.DeformableDetrConfig(
        backbone_config=backbone, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=80, num_queries=15,
        two_stage_num_proposals=15, num_labels=5, **CONFIGS[name])


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Moves every float parameter and buffer off its init (zeros, ones, the offset grid), so a
    weight mapped to the wrong place, or not at all, changes the outputs. Tied heads stay tied."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for _, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        std = float(t.std()) if t.numel() > 1 else 0.0
        # Zero- or near-constant-initialised tensors (heads, offsets, attention weights) get a
        # large move: the outputs must depend on every one of them.
        t.add_(torch.randn(t.shape, generator=g) * (0.5 * std if std > 0.05 else 0.2))
    for name, t in model.named_buffers():
        if name.endswith("running_var"):
            t.abs_().add_(0.5)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        torch.manual_seed(0)
        hf = transformers.DeformableDetrForObjectDetection(hf_config(request.param)).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    randomize_(hf, seed=1)
    ours = load_ddetr_model(hf).eval()  # strict: every key maps, every weight of ours is set
    return request.param, hf, ours


def images(sizes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]


@torch.no_grad()
def both(hf, ours, sizes):
    ims = images(sizes)
    x, sized = ours.preprocess(ims)
    mask = ~padding_mask(sized, tuple(x.shape[-2:]), x.device)
    theirs = hf(pixel_values=x, pixel_mask=mask.long())
    return theirs, ours(ims)


def level_shapes(ours, sizes) -> list[tuple[int, int]]:
    """The (H_l, W_l) of our levels, coarse to fine, for a batch of images of `sizes`."""
    x, sized = ours.preprocess(images(sizes))
    maps, _ = ours.levels(ours.backbone(x), padding_mask(sized, tuple(x.shape[-2:]), x.device))
    return [tuple(m.shape[-2:]) for m in maps]


def coarse_to_fine(per_token: torch.Tensor, sizes_coarse_to_fine: list[int]) -> torch.Tensor:
    """(B, S, k) in transformers' token order (levels fine to coarse) -> ours."""
    parts = per_token.split(sizes_coarse_to_fine[::-1], dim=1)
    return torch.cat(parts[::-1], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("batch", list(BATCHES))
def test_outputs_equal_transformers(pair, batch):
    name, hf, ours = pair
    theirs, mine = both(hf, ours, BATCHES[batch])
    diffs = {"logits": (theirs.logits - mine["pred_logits"]).abs().max(),
             "boxes": (theirs.pred_boxes - mine["pred_boxes"]).abs().max()}
    # Auxiliary predictions: transformers returns every layer's hidden state and reference;
    # its own heads turn them into the same per-layer predictions we return.
    hs, refs, init = theirs.intermediate_hidden_states, theirs.intermediate_reference_points, theirs.init_reference_points
    assert len(mine["aux_outputs"]) == hs.shape[1] - 1 == 2
    for i, aux in enumerate(mine["aux_outputs"]):
        ref = init if i == 0 else refs[:, i - 1]
        logits = hf.class_embed[i](hs[:, i])
        boxes = box_from_reference(hf.bbox_embed[i](hs[:, i]), ref)
        diffs[f"aux{i}_logits"] = (logits - aux["pred_logits"]).abs().max()
        diffs[f"aux{i}_boxes"] = (boxes - aux["pred_boxes"]).abs().max()
    if name == "twostage_refine":
        # One proposal per encoder token: transformers orders the tokens fine to coarse, we coarse to fine.
        sizes = [h * w for h, w in level_shapes(ours, BATCHES[batch])]
        enc = mine["enc_outputs"]
        their_logits = coarse_to_fine(theirs.enc_outputs_class, sizes)
        their_boxes = coarse_to_fine(theirs.enc_outputs_coord_logits, sizes)
        diffs["enc_logits"] = (their_logits - enc["pred_logits"]).abs().max()
        usable = torch.isfinite(their_boxes).all(-1)  # not padding, not at the border
        assert usable.any() and (usable.all() == (batch == "same_size"))
        assert torch.equal(enc["pred_boxes"][~usable], torch.ones_like(enc["pred_boxes"][~usable]))  # sigmoid(inf)
        diffs["enc_boxes"] = (their_boxes.sigmoid()[usable] - enc["pred_boxes"][usable]).abs().max()
    else:
        assert "enc_outputs" not in mine
    print(f"\n{name}/{batch}: " + ", ".join(f"{k} {float(v):.1e}" for k, v in diffs.items()))
    bad = {k: float(v) for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad
    assert float(mine["pred_logits"].std()) > 0.01 and float(mine["pred_boxes"].std()) > 0.01  # not trivial outputs


def test_a_conversion_mistake_is_detected(pair):
    """The comparison is sensitive: not reversing the levels of one decoder layer's sampling
    offsets, or swapping two of the decoder's norms, moves the outputs far beyond TOL."""
    name, hf, ours = pair
    sizes = BATCHES["same_size"]
    with torch.no_grad():
        reference = ours(images(sizes))["pred_boxes"]
        for mutate in ("levels", "norms"):
            bad = load_ddetr_model(hf).eval()
            sd = bad.state_dict()
            if mutate == "levels":
                w = sd["decoder.layers.1.cross_attn.sampling_offsets.weight"]
                w.copy_(w.view(4, 4, -1, 64).flip(1).reshape(w.shape))
            else:
                a, b = sd["decoder.layers.0.norm1.weight"].clone(), sd["decoder.layers.0.norm2.weight"].clone()
                sd["decoder.layers.0.norm1.weight"].copy_(b)
                sd["decoder.layers.0.norm2.weight"].copy_(a)
            assert (bad(images(sizes))["pred_boxes"] - reference).abs().max() > 1e-3, mutate


def test_config_from_hf():
    cfg = config_from_hf_detr(hf_config("twostage_refine"))
    assert cfg.encoder.plan == (0, 0, 0, 2) and cfg.encoder.d_model == 64 and cfg.encoder.ffn_dim == 96
    assert (cfg.decoder.layers, cfg.decoder.num_queries, cfg.decoder.ffn_dim) == (3, 15, 80)
    assert cfg.decoder.box_refine and cfg.decoder.two_stage and cfg.num_classes == 5
    assert cfg.backbone.name == "resnet18" and cfg.backbone.freeze_bn
    bad = hf_config("plain")
    bad.backbone_config = transformers.ResNetConfig()
    with pytest.raises(CheckpointError, match="timm wrapper"):
        config_from_hf_detr(bad)


# ------------------------------------------------------------------- the original repository's names
def original_names(hf_state: dict) -> dict:
    """transformers' state dict renamed to fundamentalvision/Deformable-DETR's key names (its
    models/deformable_detr.py and deformable_transformer.py): backbone.0.body.*, transformer.*,
    decoder layers with norm2 after self-attention and norm1 after cross-attention, and
    nn.MultiheadAttention's in_proj; heads referenced again under transformer.decoder."""
    out = {}
    for k, v in hf_state.items():
        n = k.replace("model.backbone.model.", "backbone.0.body.")
        n = n.replace("model.level_embed", "transformer.level_embed")
        n = n.replace("model.query_position_embeddings", "query_embed")
        n = n.replace("model.input_proj.", "input_proj.")
        for a, b in (("self_attn_layer_norm", "norm1"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                     ("final_layer_norm", "norm2")):
            if n.startswith("model.encoder."):
                n = n.replace(a, b)
        if n.startswith("model.decoder.layers."):
            for a, b in (("self_attn_layer_norm", "norm2"), ("encoder_attn_layer_norm", "norm1"),
                         ("encoder_attn.", "cross_attn."), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                         ("final_layer_norm", "norm3"), ("self_attn.o_proj", "self_attn.out_proj")):
                n = n.replace(a, b)
        n = n.replace("model.", "transformer.", 1) if n.startswith("model.") else n
        out[n] = v
    for layer in {k.split(".")[3] for k in out if ".self_attn.q_proj." in k}:
        p = f"transformer.decoder.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            out[p + f"in_proj_{kind}"] = torch.cat([out.pop(p + f"{q}_proj.{kind}") for q in "qkv"])
    return out


def test_original_checkpoint_names_convert_to_the_same_model(pair):
    name, hf, ours = pair
    state = original_names(hf.state_dict())
    assert detect_naming(state) == "original" and detect_naming(hf.state_dict()) == "hf"
    assert "transformer.decoder.layers.0.cross_attn.sampling_offsets.weight" in state
    assert "backbone.0.body.layer1.0.conv1.weight" in state and "input_proj.3.0.weight" in state
    assert ("query_embed.weight" in state) == (name == "plain")
    cfg = config_from_hf_detr(hf.config)
    converted, ignored, unmapped = convert_ddetr_state_dict(state, cfg)
    assert not unmapped
    mine = ours.state_dict()
    assert set(converted) == {k for k in mine if not k.endswith("num_batches_tracked")}
    for k, v in converted.items():
        assert torch.equal(v, mine[k]), k
    # A decoder head copy that is not the head itself is refused.
    if name == "twostage_refine":
        state["transformer.decoder.bbox_embed.0.layers.0.bias"] = state["bbox_embed.0.layers.0.bias"] + 1
        with pytest.raises(CheckpointError, match="differs"):
            convert_ddetr_state_dict(state, cfg)


def test_weights_files_load_through_load_model(pair, tmp_path):
    """A transformers save_pretrained folder (config from its config.json) and an original-named
    .pth ({"model": state}, config from the preset) both load as our detector with the same outputs."""
    from proscale.checkpoints.loader import load_model

    name, hf, ours = pair
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    from_folder, info = load_model(folder)
    assert info.source == "deformable-detr" and info.config == config_from_hf_detr(hf.config)
    pth = tmp_path / "r50_deformable_detr.pth"
    torch.save({"model": original_names(hf.state_dict()), "args": None}, pth)
    with pytest.raises(CheckpointError, match="preset"):
        load_model(pth)
    from_pth, info = load_model(pth, preset=config_from_hf_detr(hf.config))
    assert info.source == "deformable-detr" and info.config.num_classes == 5
    ims = images(BATCHES["same_size"])
    with torch.no_grad():
        want = ours(ims)["pred_boxes"]
        assert torch.equal(from_folder(ims)["pred_boxes"], want) and torch.equal(from_pth(ims)["pred_boxes"], want)


def test_unknown_state_dict_is_refused():
    with pytest.raises(CheckpointError, match="not a Deformable DETR"):
        detect_naming({"pixel_decoder.encoder.layers.0.norm1.weight": torch.zeros(1)})
