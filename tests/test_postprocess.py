"""Panoptic / instance / semantic inference on hand-made query predictions."""
from __future__ import annotations

import torch

from proscale.models.postprocess import (
    InferenceConfig,
    instance_inference,
    panoptic_inference,
    postprocess,
    resize_mask_logits,
    semantic_inference,
)

K = 3  # class 0 is a thing, 1 and 2 are stuff; index 3 is "no object"
THINGS = {0}
BIG = 12.0


def _cls(label: int, strength: float = BIG) -> torch.Tensor:
    logits = torch.zeros(K + 1)
    logits[label] = strength
    return logits


def _mask(h: int, w: int, *regions) -> torch.Tensor:
    """+BIG inside the given (row slice, col slice) regions, -BIG elsewhere."""
    m = torch.full((h, w), -BIG)
    for rows, cols in regions:
        m[rows, cols] = BIG
    return m


def _scene():
    """8 x 9 image: four quadrants of the left 8 columns, column 8 uncovered by them.

    q0 thing  top-left        q1 thing  bottom-left
    q2 stuff1 top-right       q3 stuff1 bottom-right (merges with q2)
    q4 stuff2 whole image, low class score          q5 no object
    q6 thing, a bit less confident than q0: q0's quadrant plus 2 pixels of column 8
       (wins only those 2 of its 18 pixels -> dropped by the overlap threshold)
    """
    h, w = 8, 9
    top, bottom, left, right = slice(0, 4), slice(4, 8), slice(0, 4), slice(4, 8)
    cls = torch.stack([
        _cls(0), _cls(0), _cls(1), _cls(1),
        _cls(2, strength=1.0),  # softmax max ~ 0.48 < 0.8
        _cls(K),
        _cls(0, strength=BIG - 2),
    ])
    masks = torch.stack([
        _mask(h, w, (top, left)), _mask(h, w, (bottom, left)),
        _mask(h, w, (top, right)), _mask(h, w, (bottom, right)),
        _mask(h, w, (slice(0, 8), slice(0, 9))),
        _mask(h, w, (slice(0, 8), slice(0, 9))),
        _mask(h, w, (top, left), (slice(0, 2), slice(8, 9))),
    ])
    return cls, masks


def test_panoptic_segments_stuff_merging_and_thresholds():
    cls, masks = _scene()
    out = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.8, overlap_threshold=0.8)
    seg, info = out["panoptic_seg"], out["segments_info"]
    assert seg.dtype == torch.int32 and seg.shape == (8, 9)
    by_cat = {}
    for s in info:
        by_cat.setdefault(s["category_id"], []).append(s)
    # Two separate things, one merged stuff segment of class 1, nothing of the low-score class 2.
    assert sorted(by_cat) == [0, 1] and len(by_cat[0]) == 2 and len(by_cat[1]) == 1
    stuff = by_cat[1][0]
    assert stuff["isthing"] is False and stuff["area"] == 32
    assert (seg[:, 4:8] == stuff["id"]).all()
    t0, t1 = by_cat[0]
    assert t0["isthing"] and t1["isthing"] and t0["id"] != t1["id"]
    assert {int(seg[0, 0]), int(seg[7, 0])} == {t0["id"], t1["id"]}
    assert (seg[:4, :4] == seg[0, 0]).all() and (seg[4:, :4] == seg[7, 0]).all()
    assert t0["area"] == t1["area"] == 16
    # The occluded query q6 is gone and its 2 won pixels stay void, as does the rest of column 8.
    assert (seg[:, 8] == 0).all()
    assert len(info) == 3 and sorted(s["id"] for s in info) == [1, 2, 3]
    assert all(0.8 < s["score"] <= 1.0 for s in info)


def test_panoptic_overlap_threshold_low_keeps_occluded_query():
    cls, masks = _scene()
    out = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.8, overlap_threshold=0.1)
    seg = out["panoptic_seg"]
    assert len(out["segments_info"]) == 4
    q6 = [s for s in out["segments_info"] if s["area"] == 2]
    assert len(q6) == 1 and (seg[:2, 8] == q6[0]["id"]).all() and (seg[2:, 8] == 0).all()


def test_panoptic_low_threshold_admits_low_score_query_and_things_stay_separate():
    cls, masks = _scene()
    # Class 1 as a thing: q2 and q3 become two segments.
    out = panoptic_inference(cls, masks, {0, 1}, object_mask_threshold=0.8, overlap_threshold=0.8)
    assert sorted(s["category_id"] for s in out["segments_info"]) == [0, 0, 1, 1]
    # With the object threshold below q4's score, q4 (whole image, class 2) enters but only wins
    # column 8 (the others are more confident): 8 of its 72 pixels, dropped by overlap 0.8 ...
    out = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.3, overlap_threshold=0.8)
    assert 2 not in [s["category_id"] for s in out["segments_info"]]
    # ... and kept with overlap 0.05 (6 / 72 won): column 8 rows 2-7 (q6 keeps rows 0-1).
    out = panoptic_inference(cls, masks, THINGS, object_mask_threshold=0.3, overlap_threshold=0.05)
    (s2,) = [s for s in out["segments_info"] if s["category_id"] == 2]
    assert s2["area"] == 6 and (out["panoptic_seg"][2:, 8] == s2["id"]).all()


def test_panoptic_all_void_when_nothing_kept():
    cls = torch.stack([_cls(K), _cls(0, strength=0.5)])
    masks = torch.randn(2, 5, 6)
    out = panoptic_inference(cls, masks, THINGS, 0.8, 0.8)
    assert out["segments_info"] == [] and (out["panoptic_seg"] == 0).all()
    assert out["panoptic_seg"].shape == (5, 6) and out["panoptic_seg"].dtype == torch.int32


def test_semantic_inference_matches_loop():
    torch.manual_seed(0)
    cls, masks = torch.randn(5, K + 1), torch.randn(5, 4, 6)
    out = semantic_inference(cls, masks)
    assert out.shape == (K, 4, 6)
    probs = cls.softmax(-1)
    expected = sum(probs[q, :K, None, None] * masks[q].sigmoid()[None] for q in range(5))
    torch.testing.assert_close(out, expected)


def test_instance_inference_topk_scores_and_things():
    torch.manual_seed(0)
    q = 4
    cls, masks = torch.randn(q, K + 1) * 2, torch.randn(q, 6, 7) * 3
    out = instance_inference(cls, masks, None, topk=5)
    probs = cls.softmax(-1)[:, :K]
    top, idx = probs.flatten().topk(5)
    assert out["labels"].tolist() == (idx % K).tolist() and out["labels"].dtype == torch.int64
    queries = (idx // K).tolist()
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (5, 6, 7)
    for n, qi in enumerate(queries):
        m = masks[qi] > 0
        assert torch.equal(out["masks"][n], m)
        expected = top[n] * masks[qi].sigmoid()[m].mean()
        torch.testing.assert_close(out["scores"][n], expected)
    # Thing classes only: every label is a thing; still topk entries (4 queries x 1 class).
    things = instance_inference(cls, masks, {0}, topk=5)
    assert len(things["labels"]) == 4 and set(things["labels"].tolist()) == {0}
    assert len(instance_inference(cls, masks, None, topk=100)["scores"]) == q * K
    empty = instance_inference(cls, masks, set(), topk=5)
    assert empty["masks"].shape == (0, 6, 7) and len(empty["scores"]) == 0


def test_resize_crops_padding():
    # Padded batch 32x32 (logits 8x8); this image is 20x24 before padding, originally 40x48.
    logits = torch.full((2, 8, 8), -BIG)
    logits[0, 6:, :] = BIG  # rows 24-31 of the padded input: padding only
    logits[1, :2, :2] = BIG  # top-left 8x8 of the input
    out = resize_mask_logits(logits, image_size=(20, 24), padded_size=(32, 32), output_size=(40, 48))
    assert out.shape == (2, 40, 48) and out.dtype == torch.float32
    assert (out[0] < 0).all()  # the mask in the padded region disappears
    fg = out[1] > 0
    assert fg[:14, :14].all() and not fg[18:, :].any() and not fg[:, 18:].any()
    # Without padding nothing is cropped: the bottom mask survives (rows 24-25 are blended).
    same = resize_mask_logits(logits, (32, 32), (32, 32), (32, 32))
    assert (same[0, 26:] == BIG).all() and (same[0, :22] < 0).all()


def test_postprocess_batch_output_sizes():
    torch.manual_seed(0)
    b, q = 2, 5
    outputs = {
        "pred_logits": torch.randn(b, q, K + 1),
        "pred_masks": torch.randn(b, q, 8, 10),
        "image_sizes": [(32, 40), (24, 30)],
        "padded_size": (32, 40),
    }
    meta = [{"height": 64, "width": 80}, {"height": 48, "width": 61}]
    cfg = InferenceConfig(panoptic_on=True, instance_on=True, semantic_on=True, object_mask_threshold=0.0)
    results = postprocess(outputs, meta, cfg, thing_ids=THINGS)
    assert len(results) == 2
    for r, m in zip(results, meta):
        size = (m["height"], m["width"])
        assert set(r) == {"panoptic", "instances", "sem_seg"}
        assert r["panoptic"]["panoptic_seg"].shape == size
        assert r["instances"]["masks"].shape[1:] == size
        assert set(r["instances"]["labels"].tolist()) <= THINGS
        assert r["sem_seg"].shape == (K, *size)
        areas = sum(s["area"] for s in r["panoptic"]["segments_info"])
        assert areas == int((r["panoptic"]["panoptic_seg"] > 0).sum())
    only_sem = postprocess(outputs, meta, InferenceConfig(panoptic_on=False, instance_on=False, semantic_on=True))
    assert set(only_sem[0]) == {"sem_seg"}
