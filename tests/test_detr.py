"""Deformable DETR's parts: box targets from masks, the matcher, the set loss, post-processing,
two-stage proposals, and a tiny detector that learns (the loss falls on one batch). Output
parity with transformers is in tests/test_detr_hf_parity.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou

import proscale
from proscale.config import LossConfig
from proscale.models.detr.criterion import BoxMatcher, build_detr_criterion
from proscale.models.detr.heads import box_from_reference, inverse_sigmoid
from proscale.models.detr.postprocess import detections
from proscale.models.detr.targets import box_targets, mask_boxes
from proscale.models.detr.two_stage import token_proposals


def test_mask_boxes_are_pixel_edges():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 5, 7] = True  # one pixel in the corner
    assert mask_boxes(masks).tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 0, 0]]
    assert mask_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_box_targets_normalise_by_the_image_and_drop_empty_instances():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)  # padded to 8x10; the image is 6x8
    masks[0, 0:3, 2:6] = True
    t = box_targets([{"labels": torch.tensor([4, 1]), "masks": masks}], [(6, 8)])[0]
    assert t["labels"].tolist() == [4]
    assert torch.allclose(t["boxes"], torch.tensor([[4 / 8, 1.5 / 6, 4 / 8, 3 / 6]]))
    given = box_targets([{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.0, 0.0, 8.0, 6.0]])}], [(6, 8)])[0]
    assert torch.allclose(given["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def brute_force_cost(logits, boxes, target, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0):
    """The matching cost of every (query, target) pair, one pair at a time."""
    Q, N = logits.shape[0], len(target["labels"])
    out = torch.zeros(Q, N)
    for q in range(Q):
        for n in range(N):
            p = torch.sigmoid(logits[q, target["labels"][n]])
            focal = alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
            l1 = (boxes[q] - target["boxes"][n]).abs().sum()
            a = torch.cat((boxes[q, :2] - boxes[q, 2:] / 2, boxes[q, :2] + boxes[q, 2:] / 2))[None]
            b = torch.cat((target["boxes"][n, :2] - target["boxes"][n, 2:] / 2,
                           target["boxes"][n, :2] + target["boxes"][n, 2:] / 2))[None]
            out[q, n] = wc * focal + wb * l1 - wg * generalized_box_iou(a, b)[0, 0]
    return out


def random_boxes(n, g):
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    return torch.cat((centre, torch.rand(n, 2, generator=g) * 0.3 + 0.05), 1)


def test_matcher_cost_and_assignment():
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(6, 5, generator=g), random_boxes(6, g)
    target = {"labels": torch.tensor([3, 0, 3]), "boxes": boxes[[4, 1, 2]] + 0.001}
    matcher = BoxMatcher()
    assert torch.allclose(matcher.cost_matrix(logits, boxes, target), brute_force_cost(logits, boxes, target), atol=1e-5)
    # Queries 4, 1, 2 sit on the targets: with the box costs dominating they are the match.
    (q, t), = matcher({"pred_logits": logits[None] * 0.01, "pred_boxes": boxes[None]}, [target])
    assert dict(zip(t.tolist(), q.tolist())) == {0: 4, 1: 1, 2: 2}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    (q, t), = matcher({"pred_logits": logits[None], "pred_boxes": boxes[None]}, [empty])
    assert len(q) == len(t) == 0
    with pytest.raises(ValueError, match="costs"):
        BoxMatcher(0, 0, 0)


def test_losses_by_hand():
    """One image, 3 queries, 2 classes, 1 target matched to query 1."""
    criterion = build_detr_criterion(2, dataclasses.replace(LossConfig(), deep_supervision=False))
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3], [-0.2, 0.1]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.4, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    target_box = torch.tensor([0.55, 0.5, 0.4, 0.3])
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "image_sizes": [(10, 10)]}
    xyxy = torch.cat((target_box[:2] - target_box[2:] / 2, target_box[:2] + target_box[2:] / 2)) * 10
    losses = criterion(outputs, [{"labels": torch.tensor([0]), "boxes": xyxy[None]}])
    onehot = torch.zeros(3, 2)
    onehot[1, 0] = 1
    p = logits[0].sigmoid()
    ce = -(onehot * p.log() + (1 - onehot) * (1 - p).log())
    pt = onehot * p + (1 - onehot) * (1 - p)
    focal = ((0.25 * onehot + 0.75 * (1 - onehot)) * (1 - pt) ** 2 * ce).sum()
    assert torch.allclose(losses["loss_focal"], focal, atol=1e-6)
    assert torch.allclose(losses["loss_bbox"], (boxes[0, 1] - target_box).abs().sum(), atol=1e-6)
    # GIoU of (0.3, 0.4, 0.7, 0.6) and (0.35, 0.35, 0.75, 0.65): intersection 0.35x0.2 = 0.07,
    # union 0.08 + 0.12 - 0.07 = 0.13, hull 0.45 x 0.3 = 0.135.
    giou = 0.07 / 0.13 - (0.135 - 0.13) / 0.135
    assert abs(float(losses["loss_giou"]) - (1 - giou)) < 1e-5
    assert criterion.weight("loss_focal_3") == 2.0 and criterion.weight("loss_bbox_enc") == 5.0
    assert criterion.weight("loss_giou") == 2.0


def test_postprocess_topk_over_queries_and_classes():
    logits = torch.tensor([[[3.0, -5.0], [-5.0, 1.0], [0.0, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2], [0.1, 0.1, 0.2, 0.2]]])
    (res,) = detections({"pred_logits": logits, "pred_boxes": boxes}, [(100, 200)], topk=3)
    assert res["queries"].tolist() == [0, 2, 1] and res["labels"].tolist() == [0, 1, 1]
    assert torch.allclose(res["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert torch.allclose(res["boxes"][0], torch.tensor([0.0, 0.0, 200.0, 100.0]))
    assert torch.allclose(res["boxes"][2], torch.tensor([0.0, 40.0, 100.0, 60.0]))


def test_box_from_reference():
    ref = torch.tensor([[0.3, 0.6]])
    delta = torch.tensor([[0.0, 0.0, 1.0, -1.0]])
    expected = torch.tensor([[0.3, 0.6, 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))]])
    assert torch.allclose(box_from_reference(delta, ref), expected)
    box = torch.tensor([[0.3, 0.6, 0.2, 0.1]])
    assert torch.allclose(box_from_reference(torch.zeros(1, 4), box), box, atol=1e-6)
    assert torch.allclose(inverse_sigmoid(torch.tensor([0.0, 1.0])), torch.tensor([math.log(1e-5), -math.log(1e-5)]))


def test_token_proposals():
    # Two levels, coarse (1x2) then fine (2x4); image 2: the right half of each map is padding.
    shapes = ((1, 2), (2, 4))
    pad = torch.zeros(2, 2 + 8, dtype=torch.bool)
    pad[1, 1] = True
    pad[1, 2:].view(2, 4)[:, 2:] = True
    proposals, usable = token_proposals(pad, shapes)
    boxes = proposals.sigmoid()
    # Image 1, fine level token (row 1, col 2): centre (2.5/4, 1.5/2), side 0.05 (finest level).
    assert torch.allclose(boxes[0, 2 + 6], torch.tensor([2.5 / 4, 1.5 / 2, 0.05, 0.05]), atol=1e-5)
    # Coarse level: side 0.1; image 2's valid width is 1 token there, 2 on the fine level.
    assert torch.allclose(boxes[1, 0], torch.tensor([0.5, 0.5, 0.1, 0.1]), atol=1e-5)
    assert torch.allclose(boxes[1, 2 + 5], torch.tensor([1.5 / 2, 1.5 / 2, 0.05, 0.05]), atol=1e-5)
    assert usable[1, :, 0].tolist() == [True, False, True, True, False, False, True, True, False, False]
    assert torch.isinf(proposals[1, 1]).all()


def tiny_detector(**decoder):
    cfg = proscale.get_preset("proscale_ddetr_nano_2222")
    cfg.num_classes = 3
    cfg.encoder = dataclasses.replace(cfg.encoder, d_model=32, n_heads=2, ffn_dim=64, plan=(1, 1, 1, 1))
    cfg.decoder = dataclasses.replace(cfg.decoder, num_queries=10, layers=2, n_heads=2, ffn_dim=64, **decoder)
    return proscale.build_model(cfg)


@pytest.mark.parametrize("decoder", [dict(box_refine=False), dict(box_refine=True, two_stage=True)])
def test_tiny_detector_learns_one_batch(decoder):
    """The loss falls by 40% or more in 30 AdamW steps on two images: gradients reach the
    heads, decoder, encoder (with TRC) and backbone."""
    torch.manual_seed(0)
    model = tiny_detector(**decoder).train()
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 48, 64) * 255]
    masks0 = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks0[0, 5:30, 10:40] = True
    masks0[1, 40:60, 30:60] = True
    masks1 = torch.zeros(1, 48, 64, dtype=torch.bool)
    masks1[0, 10:40, 5:25] = True
    targets = [{"labels": torch.tensor([0, 2]), "masks": masks0}, {"labels": torch.tensor([1]), "masks": masks1}]
    criterion = build_detr_criterion(3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(30):
        losses = criterion(model(images), targets)
        total = criterion.total_loss(losses)
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(float(total.detach()))
    assert ("loss_focal_enc" in losses) == bool(decoder.get("two_stage"))
    assert len([k for k in losses if k.startswith("loss_giou")]) == 2 + bool(decoder.get("two_stage"))
    assert totals[-1] < 0.6 * totals[0], totals
    assert model.encoder.trc.score.weight.grad is not None and model.encoder.trc.score.weight.grad.abs().sum() > 0


def test_box_ap_with_pycocotools():
    """Perfect boxes score AP 100; boxes at IoU ~0.6 count at AP50 but not at AP75; a wrong class scores 0."""
    from proscale.evaluation import InstanceEvaluator

    gt = {"images": [{"id": 1, "height": 100, "width": 100, "file_name": "a.jpg"}],
          "categories": [{"id": 5, "name": "box"}, {"id": 9, "name": "disc"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 9, "bbox": [60, 50, 30, 30], "area": 900, "iscrowd": 0}]}

    def ap(boxes, labels):
        ev = InstanceEvaluator(instances_json=gt, iou_type="bbox")
        ev.process_boxes(1, torch.tensor(boxes, dtype=torch.float64), torch.tensor([0.9, 0.8]), torch.tensor(labels))
        return ev.evaluate()

    perfect = ap([[10, 10, 50, 50], [60, 50, 90, 80]], [0, 1])
    assert perfect["AP"] == pytest.approx(100.0) and perfect["per_class"] == pytest.approx({"box": 100.0, "disc": 100.0})
    shifted = ap([[10, 10, 50, 50], [66, 50, 96, 80]], [0, 1])  # IoU 24*30 / (2*900 - 720) = 0.67
    assert shifted["AP50"] == pytest.approx(100.0) and shifted["AP75"] == pytest.approx(50.0)
    assert ap([[10, 10, 50, 50], [60, 50, 90, 80]], [1, 0])["AP"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="iou_type"):
        InstanceEvaluator(instances_json=gt, iou_type="keypoints")
