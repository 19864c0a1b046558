"""Evaluators: hand-computed PQ cases, torchmetrics cross-checks, mask AP, mIoU, two-rank runs.

Ground truth is written here in COCO panoptic / instances format into tmp dirs, so nothing
depends on the data loaders.
"""
from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.evaluation import (
    InstanceEvaluator, PanopticEvaluator, PQStat, SemanticEvaluator, encode_masks, format_pq_table,
    pq_compute_single, pq_summary, semantic_from_panoptic,
)
from proscale.evaluation.common import id_to_rgb, read_panoptic_png

# Data-set ids are deliberately not contiguous: 1, 3 things; 7, 9 stuff; 11 a thing never seen.
CATS = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 9, "name": "grass", "isthing": 0},
    {"id": 11, "name": "dog", "isthing": 1},
]
CONTIG = {c["id"]: i for i, c in enumerate(CATS)}


def seg(*rows: str) -> np.ndarray:
    """A segment-id map from rows of digits ('0' = void), e.g. seg("1122", "0022")."""
    return np.array([[int(ch) for ch in r] for r in rows], dtype=np.int64)


def infos(**cat_of_id) -> list[dict]:
    """infos(_1=3, _2=7) -> [{"id": 1, "category_id": 3}, {"id": 2, "category_id": 7}]."""
    return [{"id": int(k[1:]), "category_id": v} for k, v in cat_of_id.items()]


def summary(stats):
    return pq_summary(stats, [dict(c, isthing=bool(c["isthing"])) for c in CATS])


# ---------------------------------------------------------------------------- hand-computed PQ
def test_perfect_match_is_100():
    gt = seg("1122", "1122", "3333")
    segs = infos(_1=1, _2=3, _3=7)
    r = summary(pq_compute_single(gt * 5, [dict(s, id=s["id"] * 5) for s in segs], gt, segs, CONTIG))
    assert (r["PQ"], r["SQ"], r["RQ"]) == (100, 100, 100)
    assert r["N"] == 3 and r["N_th"] == 2 and r["N_st"] == 1
    assert r["per_class"]["dog"] == {"id": 11, "isthing": True, "PQ": 0, "SQ": 0, "RQ": 0, "TP": 0, "FP": 0, "FN": 0}


def test_partial_overlap_and_things_stuff_split():
    # GT: person A (6 px), person B (4 px), 2 void px, sky (12 px). Prediction: one person over
    # A and half of B, a person on the sky (FP), sky over the rest (including the void).
    gt = seg("111122",
             "110022",
             "333333",
             "333333")
    pred = seg("444444",
               "445555",
               "555566",
               "555555")
    gt_info = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 7}]
    pred_info = [{"id": 4, "category_id": 1}, {"id": 5, "category_id": 7}, {"id": 6, "category_id": 1}]
    stats = pq_compute_single(pred, pred_info, gt, gt_info, CONTIG)
    # person: pred 4 (8 px) vs A (6 px): inter 6, union 8 -> 0.75, TP. B (IoU 2/10 with
    # pred 4) is an FN; pred 6 is an FP. Person = TP 1, FP 1, FN 1, IoU 0.75.
    assert stats[1] == PQStat(iou=0.75, tp=1, fp=1, fn=1)
    # sky: pred 5 has 14 px, 2 on void (row 1 cols 2-3); gt sky 12 px; inter 10.
    # union = 14 + 12 - 10 - 2 = 14 -> IoU 10/14.
    assert stats[7].tp == 1 and stats[7].fp == 0 and stats[7].fn == 0
    assert stats[7].iou == pytest.approx(10 / 14)
    r = summary(stats)
    pq_th, pq_st = 0.75 * 0.5, 10 / 14
    assert r["PQ_th"] == pytest.approx(100 * pq_th)
    assert r["SQ_th"] == pytest.approx(75) and r["RQ_th"] == pytest.approx(50)
    assert r["PQ_st"] == pytest.approx(100 * pq_st) and r["RQ_st"] == pytest.approx(100)
    assert r["PQ"] == pytest.approx(100 * (pq_th + pq_st) / 2)
    assert (r["N"], r["N_th"], r["N_st"]) == (2, 1, 1)
    assert "All" in format_pq_table(r)


def test_iou_of_exactly_half_is_not_a_match():
    gt = seg("1111")
    for pred, tp in ((seg("5500"), 0), (seg("5550"), 1)):
        st = pq_compute_single(pred, infos(_5=1), gt, infos(_1=1), CONTIG)[1]
        if tp:  # IoU 3/4
            assert st == PQStat(iou=0.75, tp=1, fp=0, fn=0)
        else:  # IoU 2/4 = 0.5 exactly: one FP and one FN
            assert st == PQStat(iou=0.0, tp=0, fp=1, fn=1)


def test_void_handling():
    # Void pixels leave the prediction's area: a car over void + car is a perfect match.
    st = pq_compute_single(seg("5555"), infos(_5=3), seg("0011"), infos(_1=3), CONTIG)
    assert st[3] == PQStat(iou=1.0, tp=1)
    # A prediction more than half on void is no FP; exactly half is.
    gt = seg("000222")
    st = pq_compute_single(seg("777888"), infos(_7=1, _8=9), gt, infos(_2=9), CONTIG)
    assert 1 not in st and st[9] == PQStat(iou=1.0, tp=1)
    st = pq_compute_single(seg("778888"), infos(_7=1, _8=9), seg("022222"), infos(_2=9), CONTIG)
    assert st[1] == PQStat(fp=1)
    # Ground-truth ids not listed in segments_info are void too.
    st = pq_compute_single(seg("5555"), infos(_5=3), seg("4411"), infos(_1=3), CONTIG)
    assert st[3] == PQStat(iou=1.0, tp=1)
    # An unmatched GT segment is an FN even when the prediction there is empty (COCO's rule).
    st = pq_compute_single(seg("0000"), [], seg("1111"), infos(_1=3), CONTIG)
    assert st[3] == PQStat(fn=1)


def test_crowd_handling():
    # GT: a person crowd region (id 2) and one person (id 1); void at the right end.
    gt = seg("11222220")
    gt_info = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 1}]
    # Pred 5 matches person 1; pred 6 sits on the crowd (suppressed); crowd itself is no FN.
    st = pq_compute_single(seg("55666600"), infos(_5=1, _6=1), gt, gt_info, CONTIG)
    assert st[1] == PQStat(iou=1.0, tp=1)
    # Crowd + void together make the majority: 2 crowd px + 1 void px of 4 -> suppressed.
    st = pq_compute_single(seg("55007666"), infos(_5=1, _6=1, _7=3), seg("11000022"),
                           [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1, "iscrowd": 1}], CONTIG)
    # pred 6 = 3 px: 1 void + 2 crowd -> no FP. Pred 7 (car, 1 px on void) -> no FP.
    assert st == {1: PQStat(iou=1.0, tp=1)}
    # A crowd region of another class suppresses nothing: the car on the person crowd is an FP.
    st = pq_compute_single(seg("55666600"), infos(_5=1, _6=3), gt, gt_info, CONTIG)
    assert st[3] == PQStat(fp=1)
    # A prediction is never matched to a crowd segment, even a perfect one.
    st = pq_compute_single(seg("00666660"), infos(_6=1), gt, gt_info, CONTIG)
    assert st[1] == PQStat(fn=1)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):  # id in the map but not listed
        pq_compute_single(seg("55"), [], seg("11"), infos(_1=1), CONTIG)
    with pytest.raises(ValueError):  # unknown category
        pq_compute_single(seg("55"), infos(_5=2), seg("11"), infos(_1=1), CONTIG)
    with pytest.raises(ValueError):  # shapes differ
        pq_compute_single(seg("555"), infos(_5=1), seg("11"), infos(_1=1), CONTIG)


# ---------------------------------------------------------------------------- vs torchmetrics
def _random_case(rng: np.random.Generator, things: list[int], stuffs: list[int], void_cat: int):
    """One image as (category, instance) maps: GT with void; prediction a perturbed copy without void."""
    H, W = int(rng.integers(4, 13)), int(rng.integers(4, 13))
    cat = np.empty((H, W), np.int64)
    inst = np.zeros((H, W), np.int64)
    cut = int(rng.integers(0, W + 1))
    cat[:, :cut], cat[:, cut:] = rng.choice(stuffs), rng.choice(stuffs)
    for k in range(int(rng.integers(0, 5))):
        y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
        y1, x1 = y0 + int(rng.integers(1, H)), x0 + int(rng.integers(1, W))
        cat[y0:y1, x0:x1], inst[y0:y1, x0:x1] = rng.choice(things), k + 1
    if rng.random() < 0.7:  # some void
        y0, x0 = int(rng.integers(0, H)), int(rng.integers(0, W))
        cat[y0:y0 + int(rng.integers(1, 4)), x0:x0 + int(rng.integers(1, 4))] = void_cat
        inst[cat == void_cat] = 0
    gt = np.stack([cat, inst], -1)

    pred = gt.copy()
    pred[..., 1] = np.where(pred[..., 1] > 0, pred[..., 1] + 10, 0)  # ids independent of the GT's
    void = pred[..., 0] == void_cat
    pred[void] = np.array([rng.choice(stuffs), 0])
    if rng.random() < 0.5:  # shift the whole prediction by a pixel
        pred = np.roll(pred, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
    noise = rng.random((H, W)) < rng.uniform(0, 0.3)
    n = int(noise.sum())
    pcat = rng.choice(things + stuffs, size=n)
    pred[noise] = np.stack([pcat, np.where(np.isin(pcat, things), rng.integers(1, 4, size=n) + 20, 0)], -1)
    if rng.random() < 0.3:  # relabel one thing instance
        ids = np.unique(pred[..., 1][pred[..., 1] > 0])
        if len(ids):
            sel = pred[..., 1] == rng.choice(ids)
            pred[sel, 0] = rng.choice(things)
    return pred, gt


def _to_ids(pair_map: np.ndarray, void_cat: int):
    """(H, W, 2) (category, instance) -> ((H, W) segment ids, segments_info), void -> 0."""
    keys = pair_map[..., 0] * 1000 + pair_map[..., 1]
    uniq, inverse = np.unique(keys, return_inverse=True)
    ids = inverse.reshape(keys.shape) + 1
    info = []
    for i, k in enumerate(uniq.tolist()):
        if k // 1000 == void_cat:
            ids[keys == k] = 0
        else:
            info.append({"id": i + 1, "category_id": k // 1000})
    return ids, info


def test_pq_matches_torchmetrics_on_random_cases():
    from torchmetrics.detection import PanopticQuality

    things, stuffs, void_cat = [1, 3, 5], [7, 9], 99
    cats = ([{"id": c, "name": f"c{c}", "isthing": True} for c in things]
            + [{"id": c, "name": f"c{c}", "isthing": False} for c in stuffs])
    rng = np.random.default_rng(0)
    n_matched = 0
    for case in range(120):
        tm = PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True, return_per_class=True)
        total: dict[int, PQStat] = {}
        for _ in range(int(rng.integers(1, 4))):  # a few images per case, summed
            pred, gt = _random_case(rng, things, stuffs, void_cat)
            tm.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
            p_ids, p_info = _to_ids(pred, void_cat)
            g_ids, g_info = _to_ids(gt, void_cat)
            for c, st in pq_compute_single(p_ids, p_info, g_ids, g_info, set(things + stuffs)).items():
                total.setdefault(c, PQStat())
                total[c] += st
        ours = pq_summary(total, cats)
        n_matched += sum(st.tp for st in total.values())
        per_class = tm.compute().numpy()  # (C, 3): PQ, SQ, RQ; things then stuffs, sorted ids
        for row, c in zip(per_class, things + stuffs):
            oc = ours["per_class"][f"c{c}"]
            np.testing.assert_allclose([oc["PQ"], oc["SQ"], oc["RQ"]], 100 * row, atol=1e-6, err_msg=f"case {case}")
        # torchmetrics averages over classes with TP + FP + FN > 0 (its compute() result is cached,
        # so the average is taken from its per-class table and its own counts).
        valid = ((tm.true_positives + tm.false_positives + tm.false_negatives) > 0).numpy()
        avg = 100 * per_class[valid].mean(0) if valid.any() else np.full(3, np.nan)
        np.testing.assert_allclose([ours["PQ"], ours["SQ"], ours["RQ"]], avg, atol=1e-6, err_msg=f"case {case}")
    assert n_matched > 100  # the cases exercise matches, not only FP/FN


# ---------------------------------------------------------------------------- panoptic files
def _write_panoptic_gt(root, images: list[tuple[int, np.ndarray, list[dict]]]) -> tuple[str, str]:
    """Writes COCO panoptic ground truth (json + PNGs) under root; returns (json path, png dir)."""
    png_dir = os.path.join(root, "panoptic_gt")
    os.makedirs(png_dir, exist_ok=True)
    js = {"images": [], "annotations": [], "categories": CATS}
    for image_id, ids, segs in images:
        name = f"{image_id:06d}"
        Image.fromarray(id_to_rgb(ids)).save(os.path.join(png_dir, name + ".png"))
        js["images"].append({"id": image_id, "file_name": name + ".jpg", "height": ids.shape[0],
                             "width": ids.shape[1]})
        js["annotations"].append({"image_id": image_id, "file_name": name + ".png", "segments_info": segs})
    path = os.path.join(root, "panoptic_gt.json")
    with open(path, "w") as f:
        json.dump(js, f)
    return path, png_dir


def _panoptic_dataset(root):
    """Three 16x20 images: persons / cars as rectangles (one crowd), sky and grass halves.
    Large ids (300, 70000) check the PNG's three channels."""
    images = []
    for image_id in (5, 8, 13):
        ids = np.zeros((16, 20), np.int64)
        ids[:8], ids[8:] = 300, 70000
        segs = [{"id": 300, "category_id": 7, "iscrowd": 0}, {"id": 70000, "category_id": 9, "iscrowd": 0}]
        for k in range(image_id % 4 + 1):
            y, x = (3 * k) % 12, (5 * k + image_id) % 14
            ids[y:y + 4, x:x + 5] = 1000 + k
            segs.append({"id": 1000 + k, "category_id": 1 if k % 2 else 3, "iscrowd": int(k == 2)})
        ids[0, 0] = 0  # a void pixel
        images.append((image_id, ids, segs))
    return images


def _as_prediction(ids: np.ndarray, segs: list[dict]):
    """A GT image as a model output: contiguous category ids, fresh segment ids."""
    out = np.zeros_like(ids, dtype=np.int32)
    info = []
    for k, s in enumerate(segs, start=1):
        out[ids == s["id"]] = k
        info.append({"id": k, "category_id": CONTIG[s["category_id"]], "isthing": True, "score": 1.0})
    return torch.from_numpy(out), info


def test_panoptic_evaluator_files_and_outputs(tmp_path):
    images = _panoptic_dataset(tmp_path)
    gt_json, png_dir = _write_panoptic_gt(tmp_path, images)
    ev = PanopticEvaluator(gt_json=gt_json, gt_png_dir=png_dir, categories=CATS, output_dir=tmp_path / "out")
    for image_id, ids, segs in images:
        ev.process(image_id, *_as_prediction(ids, segs))
    ev.process(5, *_as_prediction(images[0][1], images[0][2]))  # a repeat counts once
    r = ev.evaluate()
    assert r["num_images"] == 3
    assert r["PQ"] == pytest.approx(100) and r["PQ_th"] == pytest.approx(100) and r["PQ_st"] == pytest.approx(100)
    assert r["N_th"] == 2 and r["N_st"] == 2  # dog never appears
    n_person = sum(1 for _, _, ss in images for s in ss if s["category_id"] == 1 and not s["iscrowd"])
    assert r["per_class"]["person"]["TP"] == n_person

    # The written predictions decode to the same segments with data-set category ids.
    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [a["image_id"] for a in out["annotations"]] == [5, 8, 13]
    a = out["annotations"][0]
    pred = read_panoptic_png(tmp_path / "out" / "predictions" / a["file_name"])
    assert {s["category_id"] for s in a["segments_info"]} <= {1, 3, 7, 9}
    st = pq_compute_single(pred, a["segments_info"], images[0][1], images[0][2], CONTIG)
    assert all(s.fp == s.fn == 0 for s in st.values())

    # A degraded prediction: drop every car from image 8 -> FN for cars there, PQ below 100.
    ev.reset()
    ids, segs = images[1][1], images[1][2]
    ev.process(8, *_as_prediction(ids, [s for s in segs if s["category_id"] != 3]))
    r = ev.evaluate()
    assert r["num_images"] == 1 and r["per_class"]["car"]["FN"] > 0 and r["PQ"] < 100


def test_evaluators_from_metadata(tmp_path):
    """Built from a metadata object as INTERFACES.md describes it (attributes, Category-like)."""
    from types import SimpleNamespace

    images = _panoptic_dataset(tmp_path)
    gt_json, png_dir = _write_panoptic_gt(tmp_path, images)
    cats = [SimpleNamespace(id=c["id"], name=c["name"], isthing=bool(c["isthing"]), color=(0, 0, 0)) for c in CATS]
    meta = SimpleNamespace(categories=cats, panoptic_json=gt_json, panoptic_root=png_dir, instances_json=None,
                           ignore_label=255)
    pan, ins, sem = PanopticEvaluator(meta), InstanceEvaluator(meta), SemanticEvaluator.from_metadata(meta)
    assert sem.num_classes == len(CATS) and sem.class_names[0] == "person"
    image_id, ids, segs = images[1]
    pan.process(image_id, *_as_prediction(ids, segs))
    masks, labels = _instances_of([images[1]])[image_id]
    ins.process(image_id, masks, np.ones(len(labels)), labels)
    assert pan.evaluate()["PQ"] == pytest.approx(100) and ins.evaluate()["AP"] == pytest.approx(100)


# ---------------------------------------------------------------------------- mask AP
def _instances_of(images):
    """The non-crowd things of each image as (masks, labels) with contiguous labels."""
    out = {}
    for image_id, ids, segs in images:
        things = [s for s in segs if s["category_id"] in (1, 3) and not s["iscrowd"]]
        masks = np.stack([ids == s["id"] for s in things]) if things else np.zeros((0,) + ids.shape, bool)
        out[image_id] = (masks, np.array([CONTIG[s["category_id"]] for s in things]))
    return out


def test_mask_ap_from_panoptic_gt(tmp_path):
    images = _panoptic_dataset(tmp_path)
    gt_json, png_dir = _write_panoptic_gt(tmp_path, images)
    ev = InstanceEvaluator(panoptic_json=gt_json, panoptic_png_dir=png_dir, categories=CATS)
    inst = _instances_of(images)
    for image_id, (masks, labels) in inst.items():
        # a stuff "instance" is dropped (not a thing)
        masks = np.concatenate([masks, np.ones((1,) + masks.shape[1:], bool)])
        labels = np.append(labels, CONTIG[7])
        ev.process(image_id, torch.from_numpy(masks), torch.ones(len(labels)), torch.from_numpy(labels))
    r = ev.evaluate()
    assert r["AP"] == pytest.approx(100) and r["AP50"] == pytest.approx(100) and r["AP75"] == pytest.approx(100)
    assert r["APs"] == pytest.approx(100) and math.isnan(r["APl"])  # all objects are small
    assert r["per_class"]["person"] == pytest.approx(100) and "sky" not in r["per_class"]

    # Swapped labels (person <-> car): lower AP.
    ev.reset()
    for image_id, (masks, labels) in inst.items():
        swapped = np.where(labels == CONTIG[1], CONTIG[3], CONTIG[1])
        ev.process(image_id, masks, np.ones(len(labels)), swapped)
    assert ev.evaluate()["AP"] < 50

    # A confident wrong mask ahead of the right ones: lower AP, but still > 0.
    ev.reset()
    for image_id, (masks, labels) in inst.items():
        wrong = np.zeros((1,) + masks.shape[1:], bool)
        wrong[-3:, -3:] = True
        ev.process(image_id, np.concatenate([wrong, masks]), np.r_[1.0, np.full(len(labels), 0.5)],
                   np.r_[labels[:1], labels])
    r = ev.evaluate()
    assert 0 < r["AP"] < 100

    # No predictions at all.
    ev.reset()
    for image_id in inst:
        ev.process(image_id, torch.zeros(0, 16, 20, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    r = ev.evaluate()
    assert r["AP"] == 0 and r["AP50"] == 0
    ev.reset()
    assert math.isnan(ev.evaluate()["AP"])  # nothing processed


def test_mask_ap_from_instances_json(tmp_path):
    H, W = 24, 30
    rng = np.random.default_rng(1)
    anns, gt_masks = [], {}
    for image_id in (1, 2):
        masks, labels = [], []
        for k in range(3):
            m = np.zeros((H, W), bool)
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            m[y:y + 8, x:x + 8] = True
            masks.append(m)
            labels.append(CONTIG[1 if k else 3])
            rle = encode_masks(m[None])[0]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATS[labels[-1]]["id"],
                         "segmentation": rle, "area": int(m.sum()), "bbox": [float(x), float(y), 8.0, 8.0],
                         "iscrowd": 0})
        gt_masks[image_id] = (np.stack(masks), np.array(labels))
    js = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.jpg"} for i in (1, 2)],
          "annotations": anns, "categories": [{"id": c["id"], "name": c["name"]} for c in CATS if c["isthing"]]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(js))
    ev = InstanceEvaluator(instances_json=str(path), categories=CATS)
    for image_id, (masks, labels) in gt_masks.items():
        ev.process(image_id, masks, np.ones(len(labels)), labels)
    r = ev.evaluate()
    assert r["AP"] == pytest.approx(100) and r["num_images"] == 2
    # Only image 1 processed: the AP is of that image alone, still 100.
    ev.reset()
    masks, labels = gt_masks[1]
    ev.process(1, masks, np.ones(3), labels)
    assert ev.evaluate()["AP"] == pytest.approx(100)


def mask_bbox(m: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def coco_ap_by_hand(hits: list[bool], num_gt: int) -> float:
    """COCO's AP at one IoU threshold: detections in score order (True = matched a ground
    truth), precision made non-increasing from the right, read at recall 0, 0.01, ..., 1 (the
    first detection reaching each recall level; 0 beyond the last recall reached), averaged."""
    tp = np.cumsum(hits)
    recall = tp / num_gt
    precision = tp / np.arange(1, len(hits) + 1)
    envelope = [max(precision[i:]) for i in range(len(hits))]
    total = 0.0
    for r in range(101):
        reached = [i for i in range(len(hits)) if recall[i] >= r / 100 - 1e-12]
        total += envelope[reached[0]] if reached else 0.0
    return total / 101


def test_mask_ap_hand_computed(tmp_path):
    """Two person masks A and B (10x10 squares); three detections with known IoUs:
    0.9 -> 82 pixels inside A (IoU 0.82), 0.6 -> a square on nothing, 0.3 -> 62 pixels inside B
    (IoU 0.62). At IoU thresholds 0.50, 0.55, 0.60 the hits are [T, F, T]; at 0.65 .. 0.80
    [T, F, F]; at 0.85, 0.90, 0.95 none. With 101-point interpolation:
      [T, F, T]: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1, 2/3, 2/3;
                 recall 0 .. 0.50 (51 points) read 1, 0.51 .. 1 (50 points) read 2/3:
                 AP = (51 + 100/3) / 101 = 253/303
      [T, F, F]: 51 points at precision 1, the rest 0: AP = 51/101
    AP = (3 * 253/303 + 4 * 51/101) / 10 = 457/1010 = 45.2475%, AP50 = 83.498%, AP75 = 50.495%.
    """
    H, W = 40, 40
    a, b, nothing = (np.zeros((H, W), bool) for _ in range(3))
    a[0:10, 0:10] = True
    b[20:30, 20:30] = True
    nothing[30:40, 0:10] = True
    p1, p3 = np.zeros((H, W), bool), np.zeros((H, W), bool)
    p1[0:8, 0:10] = True
    p1[8, 0:2] = True  # 82 pixels of A
    p3[20:26, 20:30] = True
    p3[26, 20:22] = True  # 62 pixels of B
    assert (p1.sum(), p3.sum()) == (82, 62)
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": encode_masks(m[None])[0],
             "area": int(m.sum()), "bbox": mask_bbox(m), "iscrowd": 0} for k, m in enumerate((a, b))]
    js = {"images": [{"id": 1, "height": H, "width": W, "file_name": "1.jpg"}], "annotations": anns,
          "categories": [{"id": c["id"], "name": c["name"]} for c in CATS if c["isthing"]]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(js))
    ev = InstanceEvaluator(instances_json=str(path), categories=CATS)
    ev.process(1, np.stack([p1, nothing, p3]), np.array([0.9, 0.6, 0.3]), np.full(3, CONTIG[1]))
    r = ev.evaluate()

    per_threshold = {t: coco_ap_by_hand([0.82 >= t, False, 0.62 >= t], num_gt=2)
                     for t in np.linspace(0.5, 0.95, 10)}
    assert per_threshold[0.5] == pytest.approx(253 / 303) and per_threshold[0.75] == pytest.approx(51 / 101)
    assert np.mean(list(per_threshold.values())) == pytest.approx(457 / 1010)
    assert r["AP"] == pytest.approx(100 * 457 / 1010, rel=1e-6)
    assert r["AP50"] == pytest.approx(100 * 253 / 303, rel=1e-6)
    assert r["AP75"] == pytest.approx(100 * 51 / 101, rel=1e-6)
    assert r["APs"] == pytest.approx(r["AP"]) and math.isnan(r["APm"]) and math.isnan(r["APl"])  # areas < 32^2
    assert r["per_class"]["person"] == pytest.approx(r["AP"])
    # Scores decide the order: the empty detection last makes every threshold's precision
    # higher and AP50 perfect.
    ev.reset()
    ev.process(1, np.stack([p1, nothing, p3]), np.array([0.9, 0.1, 0.3]), np.full(3, CONTIG[1]))
    r = ev.evaluate()
    assert r["AP50"] == pytest.approx(100) and r["AP75"] == pytest.approx(100 * 51 / 101, rel=1e-6)
    assert r["AP"] == pytest.approx(100 * (3 + 4 * 51 / 101) / 10, rel=1e-6)


# ---------------------------------------------------------------------------- semantic
def test_semantic_hand_computed():
    ev = SemanticEvaluator(4, ignore_label=255, class_names=["a", "b", "c", "d"])
    gt = np.array([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = np.array([[0, 1, 1, 0], [2, 0, 1, 1]])
    ev.process(torch.from_numpy(pred), torch.from_numpy(gt))
    r = ev.evaluate()
    # class 0: TP 1, FN 1 (->1), FP 1 (gt 2 -> 0; the ignored pixel does not count) -> 1/3
    # class 1: TP 3, FP 1 (gt 0 -> 1), FN 0 -> 3/4; class 2: TP 1, FN 1 -> 1/2; class 3 absent.
    ious = [1 / 3, 3 / 4, 1 / 2]
    assert r["per_class_IoU"]["a"] == pytest.approx(100 / 3) and math.isnan(r["per_class_IoU"]["d"])
    assert r["mIoU"] == pytest.approx(100 * np.mean(ious))
    assert r["pACC"] == pytest.approx(100 * 5 / 7)
    assert r["mACC"] == pytest.approx(100 * np.mean([1 / 2, 3 / 3, 1 / 2]))
    assert r["fwIoU"] == pytest.approx(100 * (2 * ious[0] + 3 * ious[1] + 2 * ious[2]) / 7)
    # Scores (K, H, W) are argmaxed; a prediction of class 3 on gt class 3 makes 3 valid.
    ev.reset()
    scores = torch.nn.functional.one_hot(torch.tensor([[3, 0]]), 4).permute(2, 0, 1).float()
    ev.process(scores, torch.tensor([[3, 0]]))
    assert ev.evaluate()["mIoU"] == pytest.approx(100)


def test_semantic_matches_torchmetrics_jaccard():
    from torchmetrics.classification import MulticlassJaccardIndex

    K = 6
    rng = np.random.default_rng(2)
    ev = SemanticEvaluator(K)
    tm = MulticlassJaccardIndex(num_classes=K, ignore_index=255, average="none")
    for _ in range(10):
        gt = rng.integers(0, K - 1, size=(9, 11))  # class K-1 never in the ground truth...
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = rng.integers(0, K - 2, size=(9, 11))  # ...nor predicted: left out of the mean
        pred = np.where(rng.random(gt.shape) < 0.5, np.clip(gt, 0, K - 2), pred)
        ev.process(pred, gt)
        tm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    r = ev.evaluate()
    ref = 100 * tm.compute().numpy()
    ours = np.array([r["per_class_IoU"][str(c)] for c in range(K)])
    np.testing.assert_allclose(ours[:K - 1], ref[:K - 1], atol=1e-4)
    assert math.isnan(ours[K - 1])
    assert r["mIoU"] == pytest.approx(ref[:K - 1].mean(), abs=1e-4)


def test_semantic_from_panoptic():
    pan = np.array([[0, 300, 300], [70000, 70000, 5]])
    segs = [{"id": 300, "category_id": 3}, {"id": 70000, "category_id": 9}]
    out = semantic_from_panoptic(pan, segs, CONTIG)
    np.testing.assert_array_equal(out, [[255, 1, 1], [3, 3, 255]])
    assert out.dtype == np.int64


# ---------------------------------------------------------------------------- two ranks
def _rank_main(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        images = _panoptic_dataset(root)
        gt_json, png_dir = os.path.join(root, "panoptic_gt.json"), os.path.join(root, "panoptic_gt")
        pan = PanopticEvaluator(gt_json=gt_json, gt_png_dir=png_dir, categories=CATS,
                                output_dir=os.path.join(root, "out"))
        ins = InstanceEvaluator(panoptic_json=gt_json, panoptic_png_dir=png_dir, categories=CATS)
        sem = SemanticEvaluator(len(CATS))
        # rank 0: images 5, 8; rank 1: images 13, 5 (a DistributedSampler-style repeat).
        mine = [images[0], images[1]] if rank == 0 else [images[2], images[0]]
        for image_id, ids, segs in mine:
            keep = [s for s in segs if s["category_id"] != 3]  # imperfect: cars missed
            pan.process(image_id, *_as_prediction(ids, keep))
            masks, labels = _instances_of([(image_id, ids, keep)])[image_id]
            ins.process(image_id, masks, np.ones(len(labels)), labels)
        for image_id, ids, segs in images if rank == 0 else []:  # semantic sums, no dedup: one rank
            sem_gt = semantic_from_panoptic(ids, segs, CONTIG)
            sem.process(np.where(sem_gt == CONTIG[3], CONTIG[9], sem_gt), sem_gt)
        out = {"pan": pan.evaluate(), "ins": ins.evaluate(), "sem": sem.evaluate()}
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == pytest.approx(b)


def test_two_ranks_match_single_process(tmp_path):
    images = _panoptic_dataset(tmp_path)
    _write_panoptic_gt(tmp_path, images)
    # fork: the children reuse the imported modules (spawn would import torch again in each).
    torch.multiprocessing.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert _same(r0, r1)
    # The same work in one process.
    gt_json, png_dir = str(tmp_path / "panoptic_gt.json"), str(tmp_path / "panoptic_gt")
    pan = PanopticEvaluator(gt_json=gt_json, gt_png_dir=png_dir, categories=CATS)
    ins = InstanceEvaluator(panoptic_json=gt_json, panoptic_png_dir=png_dir, categories=CATS)
    sem = SemanticEvaluator(len(CATS))
    for image_id, ids, segs in images:
        keep = [s for s in segs if s["category_id"] != 3]
        pan.process(image_id, *_as_prediction(ids, keep))
        masks, labels = _instances_of([(image_id, ids, keep)])[image_id]
        ins.process(image_id, masks, np.ones(len(labels)), labels)
        sem_gt = semantic_from_panoptic(ids, segs, CONTIG)
        sem.process(np.where(sem_gt == CONTIG[3], CONTIG[9], sem_gt), sem_gt)
    single = json.loads(json.dumps({"pan": pan.evaluate(), "ins": ins.evaluate(), "sem": sem.evaluate()}))
    assert _same(r0, single)
    assert r0["pan"]["num_images"] == 3 and r0["pan"]["PQ"] < 100
    # Rank 0 wrote every image's prediction.
    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in out["annotations"]) == [5, 8, 13]
