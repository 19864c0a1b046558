"""Point sampling, Hungarian matcher and set criterion (Mask2Former losses)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import proscale.models.criterion as criterion_module
from proscale.models.criterion import LossConfig, SetCriterion, build_criterion, pad_targets
from proscale.models.matcher import HungarianMatcher
from proscale.models.point_sampling import (
    calculate_uncertainty,
    get_uncertain_point_coords_with_randomness,
    point_sample,
)

K = 5  # classes; index K is "no object"


# ---- helpers --------------------------------------------------------------------------------

def _blob_masks(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n distinct rectangles on a size x size grid, aligned to 4-pixel blocks. (n, size, size) bool."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    cells = size // 4
    for i in range(n):
        y0, x0 = torch.randint(0, cells - 2, (2,), generator=gen).tolist()
        hh, ww = torch.randint(2, cells - max(y0, x0) + 1, (2,), generator=gen).tolist()
        masks[i, 4 * y0: 4 * (y0 + hh), 4 * x0: 4 * (x0 + ww)] = True
    return masks


def _perfect_outputs(targets, perms, q: int, stride: int = 4, value: float = 10.0):
    """Predictions where query perms[b][i] is a copy of target i; other queries predict no object.

    Mask logits are at 1/stride of the target size (+-value where the target is 1/0)."""
    b = len(targets)
    h, w = targets[0]["masks"].shape[-2:]
    logits = torch.full((b, q, K + 1), -10.0)
    logits[:, :, K] = 10.0
    masks = torch.full((b, q, h // stride, w // stride), -10.0)
    for bi, (t, perm) in enumerate(zip(targets, perms)):
        if len(perm) == 0:
            continue
        small = F.avg_pool2d(t["masks"].float(), stride)  # block-aligned: exact 0/1
        for i, qi in enumerate(perm):
            logits[bi, qi] = -10.0
            logits[bi, qi, t["labels"][i]] = 10.0
            masks[bi, qi] = torch.where(small[i] > 0.5, value, -value)
    return {"pred_logits": logits, "pred_masks": masks}


def _make_batch(seed: int = 0, n_per_image=(3, 4), size: int = 32, q: int = 8):
    gen = torch.Generator().manual_seed(seed)
    targets, perms = [], []
    for n in n_per_image:
        targets.append({"labels": torch.randint(0, K, (n,), generator=gen), "masks": _blob_masks(n, size, gen)})
        perms.append(torch.randperm(q, generator=gen)[:n].tolist())
    return targets, perms


# ---- point sampling -------------------------------------------------------------------------

def _manual_bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """img (C, H, W); (x, y) normalised, pixel centres at (i + 0.5) / W; zeros outside."""
    c, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def test_point_sample_matches_manual_bilinear():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    coords = torch.tensor(
        [[[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.13, 0.87]],
         [[0.99, 0.01], [0.3, 0.7], [0.5 / 7, 0.5 / 5], [0.71, 0.29]]], dtype=torch.float64)
    out = point_sample(img, coords)
    assert out.shape == (2, 3, 4)
    for n in range(2):
        for p in range(4):
            x, y = coords[n, p].tolist()
            torch.testing.assert_close(out[n, :, p], _manual_bilinear(img[n], x, y).to(out.dtype))
    # (0.5/W, 0.5/H) is exactly the centre of pixel (0, 0).
    torch.testing.assert_close(out[1, :, 2], img[1, :, 0, 0])


def test_point_sample_rejects_bad_coords():
    with pytest.raises(ValueError):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 3))


def test_uncertain_points_concentrate_on_boundary():
    torch.manual_seed(0)
    # Logits change sign at x = 0.5: the uncertain region is a vertical line.
    xs = (torch.arange(64) + 0.5) / 64
    logits = ((xs - 0.5) * 40).expand(2, 1, 64, 64).contiguous()
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 400, 3.0, 0.75)
    assert coords.shape == (2, 400, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    important, rest = coords[:, :300], coords[:, 300:]
    # Top-300 of 1200 uniform points by |x - 0.5| lie within ~0.125 of the line; random ones
    # ~0.25 on average. (Not all of them: zero padding halves the logits at the top and bottom
    # edges, so a few edge points are "uncertain" too.)
    assert (important[..., 0] - 0.5).abs().quantile(0.95) < 0.15
    assert (rest[..., 0] - 0.5).abs().mean() > 0.15
    # beta = 0: pure uniform sampling, still the right number of points.
    uniform = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 50, 2.0, 0.0)
    assert uniform.shape == (2, 50, 2)


# ---- matcher --------------------------------------------------------------------------------

def test_matcher_recovers_permutation_at_lower_resolution():
    targets, perms = _make_batch(seed=1, n_per_image=(3, 5), size=64, q=10)
    outputs = _perfect_outputs(targets, perms, q=10)  # logits 16x16, targets 64x64
    matcher = HungarianMatcher(num_points=2000)
    indices = matcher(outputs, targets)
    for b, ((src, tgt), perm, t) in enumerate(zip(indices, perms, targets)):
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(perm))

    # Mask costs of matched pairs are small (boundary points, where bilinear sampling blends
    # inside and outside, keep them above 0 for masks of a few cells) and clearly below every
    # other query's cost for that target. The class term contributes 2 * -p ~ -2.
    same_res = _perfect_outputs(targets, perms, q=10, stride=1)
    for b, ((src, tgt), t) in enumerate(zip(matcher(same_res, targets), targets)):
        cost = matcher.cost_matrix(same_res["pred_logits"][b], same_res["pred_masks"][b], t, torch.rand(20000, 2))
        matched = cost[src, tgt]
        assert (matched + 2.0).abs().max() < 0.5, matched
        others = cost[:, tgt].clone()
        others[src, torch.arange(len(tgt))] = float("inf")
        assert (others.min(0).values - matched).min() > 1.0


def test_matcher_cost_matches_brute_force():
    torch.manual_seed(0)
    q, n = 6, 4
    pred_logits = torch.randn(q, K + 1)
    pred_masks = torch.randn(q, 8, 8) * 3
    target = {"labels": torch.randint(0, K, (n,)), "masks": torch.rand(n, 32, 32) > 0.5}
    coords = torch.rand(300, 2)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300)
    cost = matcher.cost_matrix(pred_logits, pred_masks, target, coords)
    prob = pred_logits.softmax(-1)
    expected = torch.empty(q, n)
    for i in range(q):
        x = point_sample(pred_masks[i][None, None], coords[None])[0, 0]
        for j in range(n):
            t = point_sample(target["masks"][j].float()[None, None], coords[None])[0, 0]
            bce = F.binary_cross_entropy_with_logits(x, t)
            s = x.sigmoid()
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            expected[i, j] = 2.0 * -prob[i, target["labels"][j]] + 5.0 * bce + 5.0 * dice
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-5)


def test_matcher_handles_empty_targets_and_bf16():
    targets, perms = _make_batch(seed=2, n_per_image=(0, 2), size=32, q=6)
    outputs = _perfect_outputs(targets, perms, q=6)
    outputs = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices = HungarianMatcher(num_points=500)(outputs, targets)
    assert [len(s) for s, _ in indices] == [0, 2]
    assert indices[0][0].dtype == torch.int64 and indices[0][1].dtype == torch.int64
    assert dict(zip(indices[1][1].tolist(), indices[1][0].tolist())) == dict(enumerate(perms[1]))


def test_matcher_survives_nan_predictions():
    targets, perms = _make_batch(seed=3, n_per_image=(2,), size=32, q=4)
    outputs = _perfect_outputs(targets, perms, q=4)
    outputs["pred_masks"][0, 0] = float("nan")
    (src, tgt), = HungarianMatcher(num_points=200)(outputs, targets)
    assert len(src) == 2


# ---- criterion ------------------------------------------------------------------------------

def _criterion(**kw) -> SetCriterion:
    cfg = LossConfig(num_points=600, **kw)
    return build_criterion(K, cfg)


def test_perfect_predictions_give_much_smaller_losses():
    torch.manual_seed(0)
    targets, perms = _make_batch(seed=4, n_per_image=(3, 4), size=64, q=10)
    perfect = _perfect_outputs(targets, perms, q=10)  # stride-4 logits, as the model gives
    random = {"pred_logits": torch.randn(2, 10, K + 1), "pred_masks": torch.randn(2, 10, 16, 16)}
    crit = _criterion()
    good, bad = crit(perfect, targets), crit(random, targets)
    # Importance sampling puts 3/4 of the points on mask boundaries, where even a perfect
    # stride-4 prediction is blurred by interpolation: mask losses stay a little above 0.
    assert good["loss_ce"] < 0.01 * bad["loss_ce"]
    assert good["loss_mask"] < 0.1 * bad["loss_mask"]
    assert good["loss_dice"] < 0.2 * bad["loss_dice"]


class FixedMatcher(torch.nn.Module):
    """Returns the given matches, so the losses below depend on nothing random."""

    def __init__(self, indices):
        super().__init__()
        self.indices = indices

    def forward(self, outputs, targets):
        return self.indices


def test_losses_equal_their_formulas_by_hand(monkeypatch):
    """BCE, Dice and class losses against their formulas, evaluated with math on every pixel.

    The point sampler is replaced by one that returns every pixel centre of the (same-size)
    logits and targets, where bilinear sampling reads the pixel values exactly.
    """
    h, w = 3, 4
    centres = torch.tensor([[(j + 0.5) / w, (i + 0.5) / h] for i in range(h) for j in range(w)])
    cfg = LossConfig(num_points=77, oversample_ratio=2.0, importance_sample_ratio=0.5)

    def every_pixel_centre(logits, uncertainty_fn, num_points, oversample_ratio, importance_sample_ratio):
        assert logits.shape[1:] == (1, h, w)
        assert (num_points, oversample_ratio, importance_sample_ratio) == (77, 2.0, 0.5)
        return centres.expand(logits.shape[0], -1, -1)

    monkeypatch.setattr(criterion_module, "get_uncertain_point_coords_with_randomness", every_pixel_centre)
    g = torch.Generator().manual_seed(0)
    pred_masks = torch.randn(2, 3, h, w, generator=g) * 2
    pred_logits = torch.randn(2, 3, K + 1, generator=g)
    targets = [
        {"labels": torch.tensor([1, 4]), "masks": torch.rand(2, h, w, generator=g) > 0.5},
        # more targets than queries: one stays unmatched, but still counts in the normaliser
        {"labels": torch.tensor([2, 0, 3, 2]), "masks": torch.rand(4, h, w, generator=g) > 0.5},
    ]
    indices = [(torch.tensor([2, 0]), torch.tensor([1, 0])), (torch.tensor([1, 0, 2]), torch.tensor([3, 0, 2]))]
    crit = SetCriterion(K, FixedMatcher(indices), cfg)
    losses = crit({"pred_logits": pred_logits, "pred_masks": pred_masks, "padded_size": (h, w)}, targets)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    bce = dice = 0.0
    pairs = [(b, q, t) for b, (src, tgt) in enumerate(indices) for q, t in zip(src.tolist(), tgt.tolist())]
    for b, q, t in pairs:
        x = pred_masks[b, q].flatten().tolist()
        y = targets[b]["masks"][t].flatten().float().tolist()
        p = [sigmoid(v) for v in x]
        # sigmoid BCE, averaged over the points of the mask
        bce += sum(-(yi * math.log(pi) + (1 - yi) * math.log(1 - pi)) for pi, yi in zip(p, y)) / len(x)
        # 1 - (2 sum(p t) + 1) / (sum p + sum t + 1)
        dice += 1 - (2 * sum(pi * yi for pi, yi in zip(p, y)) + 1) / (sum(p) + sum(y) + 1)
    assert len(pairs) == 5
    num_masks = 6  # target masks in the batch, matched or not
    assert losses["loss_mask"].item() == pytest.approx(bce / num_masks, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice / num_masks, rel=1e-5)
    # Class loss: cross-entropy over all 6 queries, unmatched ones target "no object" (K) with
    # weight 0.1; a weighted mean (sum of w * CE over the sum of w).
    target_class = {(b, q): int(targets[b]["labels"][t]) for b, q, t in pairs}
    num = den = 0.0
    for b in range(2):
        for q in range(3):
            row = pred_logits[b, q].tolist()
            c = target_class.get((b, q), K)
            ce = math.log(sum(math.exp(v) for v in row)) - row[c]
            weight = cfg.no_object_weight if c == K else 1.0
            num, den = num + weight * ce, den + weight
    assert losses["loss_ce"].item() == pytest.approx(num / den, rel=1e-5)


def test_gradients_flow_to_logits_and_masks():
    torch.manual_seed(0)
    targets, _ = _make_batch(seed=5, n_per_image=(2, 3), size=32, q=6)
    pred_logits = torch.randn(2, 6, K + 1, requires_grad=True)
    pred_masks = torch.randn(2, 6, 8, 8, requires_grad=True)
    aux = [{"pred_logits": pred_logits * 1.0, "pred_masks": pred_masks * 1.0}]
    crit = _criterion()
    losses = crit({"pred_logits": pred_logits, "pred_masks": pred_masks, "aux_outputs": aux}, targets)
    total = crit.total_loss(losses)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    for g in (pred_logits.grad, pred_masks.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_losses_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    targets, perms = _make_batch(seed=10, n_per_image=(2, 1), size=32, q=5)
    out = {k: v.to(torch.bfloat16).requires_grad_() for k, v in _perfect_outputs(targets, perms, q=5).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion()(out, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert out["pred_masks"].grad.dtype == torch.bfloat16
    # bf16 maps sampled at fp32 points stay fp32 (bf16 coordinates would be pixels off).
    assert point_sample(torch.ones(1, 1, 4, 4, dtype=torch.bfloat16), torch.rand(1, 3, 2)).dtype == torch.float32


def test_no_object_weight_in_cross_entropy():
    torch.manual_seed(0)
    targets, perms = _make_batch(seed=6, n_per_image=(2, 1), size=32, q=5)
    outputs = _perfect_outputs(targets, perms, q=5)
    # Unmatched queries now wrongly predict a class, matched ones are uncertain.
    outputs["pred_logits"] = torch.randn(2, 5, K + 1)
    crit = _criterion(no_object_weight=0.1)
    assert crit.empty_weight.tolist() == pytest.approx([1.0] * K + [0.1])
    indices = crit.matcher(outputs, targets)
    target_classes = torch.full((2, 5), K)
    for b, (src, tgt) in enumerate(indices):
        target_classes[b, src] = targets[b]["labels"][tgt]
    ce = F.cross_entropy(outputs["pred_logits"].flatten(0, 1), target_classes.flatten(), reduction="none")
    w = torch.where(target_classes.flatten() == K, 0.1, 1.0)
    expected = (w * ce).sum() / w.sum()
    torch.testing.assert_close(crit.loss_labels(outputs["pred_logits"], targets, indices), expected)
    unweighted = _criterion(no_object_weight=1.0).loss_labels(outputs["pred_logits"], targets, indices)
    torch.testing.assert_close(unweighted, ce.mean())


def test_images_without_targets():
    torch.manual_seed(0)
    targets, _ = _make_batch(seed=7, n_per_image=(0, 2), size=32, q=4)
    pred_logits = torch.randn(2, 4, K + 1, requires_grad=True)
    pred_masks = torch.randn(2, 4, 8, 8, requires_grad=True)
    crit = _criterion()
    losses = crit({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    # The whole batch empty: only the class loss is non-zero, the graph still reaches the masks.
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}] * 2
    losses = crit({"pred_logits": pred_logits, "pred_masks": pred_masks}, empty)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    crit.total_loss(losses).backward()
    assert pred_masks.grad is not None and pred_logits.grad.abs().sum() > 0


def test_aux_losses_keys_and_weights():
    torch.manual_seed(0)
    targets, perms = _make_batch(seed=8, n_per_image=(2, 2), size=32, q=6)
    out = _perfect_outputs(targets, perms, q=6)
    out["aux_outputs"] = [{"pred_logits": torch.randn(2, 6, K + 1), "pred_masks": torch.randn(2, 6, 8, 8)}
                          for _ in range(3)]
    crit = _criterion()
    losses = crit(out, targets)
    base = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == set(base) | {f"{k}_{i}" for k in base for i in range(3)}
    assert all(crit.weight_dict[k] == crit.weight_dict[k.rsplit("_", 1)[0]] for k in losses if k[-1].isdigit())
    expected = sum(crit.weight_dict[k] * v for k, v in losses.items())
    torch.testing.assert_close(crit.total_loss(losses), expected)
    assert crit.weight_dict["loss_ce"] == 2.0 and crit.weight_dict["loss_mask_2"] == 5.0
    # Aux outputs are random: their losses exceed the final (perfect) ones.
    assert losses["loss_dice_0"] > losses["loss_dice"]
    no_aux = _criterion(deep_supervision=False)(out, targets)
    assert set(no_aux) == set(base)


def test_pad_targets():
    t = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 5, 6, dtype=torch.bool)},
         {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 8, 8)}]
    padded = pad_targets(t, (8, 8))
    assert padded[0]["masks"].shape == (1, 8, 8) and padded[0]["masks"].dtype == torch.bool
    assert padded[0]["masks"].sum() == 30 and padded[0]["masks"][0, :5, :6].all()
    assert padded[1]["masks"].shape == (0, 8, 8) and padded[1]["labels"] is t[1]["labels"]
    with pytest.raises(ValueError):
        pad_targets(t, (4, 8))


def test_criterion_pads_unpadded_targets_itself():
    targets, perms = _make_batch(seed=9, n_per_image=(2, 3), size=32, q=6)
    out = _perfect_outputs(targets, perms, q=6)
    out["pred_masks"] = F.pad(out["pred_masks"], (0, 2, 0, 2), value=-10.0)  # padded batch: 40x40
    out["pred_logits"] = out["pred_logits"] + torch.randn_like(out["pred_logits"])
    out["padded_size"] = (40, 40)
    # Images smaller than the batch: crop the second image's masks to 24x32 (its content fits).
    targets[1] = {**targets[1], "masks": targets[1]["masks"][:, :24, :]}
    crit = _criterion()
    torch.manual_seed(0)
    own = crit(out, targets)
    torch.manual_seed(0)
    ref = crit({k: v for k, v in out.items() if k != "padded_size"}, pad_targets(targets, (40, 40)))
    for k in own:
        torch.testing.assert_close(own[k], ref[k])


def test_num_masks_all_reduced_when_distributed(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    targets, perms = _make_batch(seed=11, n_per_image=(2, 3), size=32, q=6)
    out = _perfect_outputs(targets, perms, q=6)
    crit = _criterion()
    torch.manual_seed(0)
    local = crit(out, targets)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert SetCriterion._num_masks(targets, torch.device("cpu")) == 5.0
        torch.manual_seed(0)
        reduced = crit(out, targets)
    finally:
        dist.destroy_process_group()
    for k in local:
        torch.testing.assert_close(local[k], reduced[k])
    assert SetCriterion._num_masks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0
