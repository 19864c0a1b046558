"""`proscale validate-data`, `validate_dataset` and `SkipBadSamples`: one test per problem kind.

Each test copies a tiny synthetic set (or writes a tinier one), breaks it in one way and checks
the problem's kind, file and ids in the report, and that the loaders agree: a sample with an
error refuses to load with the same message, a sample without one loads.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from proscale.data import (DataError, ImageError, MissingFileError, build_dataloader,
                           build_dataset, generate_synthetic)
from proscale.data.errors import KINDS, AnnotationError, Problem
from proscale.data.validate import (SkipBadSamples, ValidationReport, add_parser, main,
                                    validate_dataset)

H, W = 48, 64


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("src")), num_train=3, num_val=2,
                              image_size=(H, W), seed=5, image_format="png")


@pytest.fixture
def root(synth_src, tmp_path):
    dst = str(tmp_path / "data")
    shutil.copytree(synth_src, dst)
    return dst


# ---------------------------------------------------------------- helpers

def jpath(root, name="panoptic_train"):
    return os.path.join(root, "annotations", name + ".json")


def edit(root, fn, name="panoptic_train"):
    path = jpath(root, name)
    data = json.load(open(path))
    fn(data)
    json.dump(data, open(path, "w"))
    return path


def img(root, image_id=1, split="train"):
    return os.path.join(root, split, f"{image_id:06d}.png")


def png(root, image_id=1, split="train"):
    return os.path.join(root, f"panoptic_{split}", f"{image_id:06d}.png")


def upright(root, image_id=1):
    return np.asarray(Image.open(img(root, image_id)).convert("RGB"))


def of(report: ValidationReport, kind: str) -> list[Problem]:
    return [p for p in report.problems if p.kind == kind]


def one(report: ValidationReport, kind: str) -> Problem:
    found = of(report, kind)
    assert len(found) == 1, (kind, [str(p) for p in report.problems])
    assert found[0].severity == KINDS[kind][0]
    return found[0]


def key(p: Problem):
    return p.kind, p.path, sorted(p.ids.items(), key=str), p.message


def check(spec: str, split: str = "train") -> ValidationReport:
    """The report, after checking that the loaders agree with it sample by sample."""
    report = validate_dataset(spec, split)
    assert report.splits[0].split == split
    listed = [key(p) for p in report.problems]
    try:
        ds = build_dataset(spec, split, defer_errors=True)
    except DataError as e:
        assert key(e.problems[0]) in listed
        assert report.errors
        return report
    strict_failed = False
    try:
        build_dataset(spec, split)
    except DataError as e:
        strict_failed = True
        assert str(e) in {str(p) for p in report.errors}
    for i in range(len(ds)):
        _, problems = ds.check_sample(i)
        for p in problems:
            assert key(p) in listed
        errors = [p for p in problems if p.is_error]
        if errors:
            with pytest.raises(DataError) as info:
                ds[i]
            assert str(info.value) == str(errors[0]) and errors[0].path in str(info.value)
            strict_failed = True
        else:
            sample = ds[i]
            assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3
            assert sample["masks"].shape[1:] == sample["image"].shape[1:]
    assert strict_failed == bool(report.errors), [str(p) for p in report.errors]
    return report


def pan(root):
    return f"coco-panoptic:{root}"


def ins(root):
    return f"coco-instances:{root}"


def save_ids_png(path, ids):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def tiny_panoptic(root, h, w):
    """One image of one stuff segment covering everything."""
    for d in ("annotations", "train", "panoptic_train"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(os.path.join(root, "train", "a.png"))
    save_ids_png(os.path.join(root, "panoptic_train", "a.png"), np.full((h, w), 5, np.int64))
    json.dump({"images": [{"id": 7, "file_name": "a.png", "height": h, "width": w}],
               "annotations": [{"image_id": 7, "file_name": "a.png",
                                "segments_info": [{"id": 5, "category_id": 1, "area": h * w}]}],
               "categories": [{"id": 1, "name": "wall", "isthing": 0}]},
              open(os.path.join(root, "annotations", "panoptic_train.json"), "w"))
    return str(root)


# ---------------------------------------------------------------- a clean set

def test_clean_set_has_no_problem(root):
    report = validate_dataset(pan(root), "all")
    assert report.ok and report.problems == [] and report.counts() == {}
    assert [(s.split, s.num_samples, s.num_checked) for s in report.splits] == [("train", 3, 3),
                                                                                 ("val", 2, 2)]
    assert sum(report.splits[0].class_counts.values()) > 0
    assert validate_dataset(ins(root), "val").ok
    # the problem vocabulary: every kind has a severity and a meaning
    assert all(sev in ("error", "warning", "note") and text for sev, text in KINDS.values())


# ---------------------------------------------------------------- files

def test_missing_image(root):
    os.remove(img(root, 2))
    p = one(check(pan(root)), "missing_image")
    assert p.path == img(root, 2) and p.ids == {"image_id": 2}


def test_missing_png(root):
    os.remove(png(root, 3))
    p = one(check(pan(root)), "missing_png")
    assert p.path == png(root, 3) and p.ids == {"image_id": 3}


def test_missing_annotation_file(root):
    os.remove(jpath(root))
    report = check(pan(root))
    assert one(report, "missing_file").path == jpath(root)


def test_unreadable_image(root):
    open(img(root, 1), "wb").write(b"this is not an image at all" * 10)
    p = one(check(pan(root)), "corrupt_image")
    assert p.path == img(root, 1) and p.ids == {"image_id": 1} and "cannot decode" in p.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(root, fmt):
    path = img(root, 2)
    buf = path + ".tmp"
    Image.open(path).convert("RGB").save(buf, format=fmt)
    data = open(buf, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])  # the name says .png; the bytes decide
    p = one(check(pan(root)), "corrupt_image")
    assert p.path == path and p.ids == {"image_id": 2}


def test_truncated_panoptic_png(root):
    data = open(png(root, 1), "rb").read()
    open(png(root, 1), "wb").write(data[: len(data) // 2])
    p = one(check(pan(root)), "corrupt_png")
    assert p.path == png(root, 1) and p.ids == {"image_id": 1}


def test_panoptic_png_wrong_mode(root):
    Image.open(png(root, 1)).convert("L").save(png(root, 1))
    p = one(check(pan(root)), "corrupt_png")
    assert "must be RGB" in p.message and p.ids == {"image_id": 1}


# ---------------------------------------------------------------- image modes (notes)

@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA", "CMYK"])
def test_image_modes_converted(root, mode):
    rgb = upright(root, 1)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    path = img(root, 1)
    if mode == "L":
        Image.fromarray(gray).save(path)
        want = np.repeat(gray[..., None], 3, 2)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([rgb, np.full((H, W), 7, np.uint8)])).save(path)
        want = rgb
    elif mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
        assert Image.open(path).mode in ("I;16", "I")
        want = np.repeat(gray[..., None], 3, 2)
    elif mode == "P":
        pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pal.save(path)
        want = np.asarray(pal.convert("RGB"))
    elif mode == "LA":
        Image.fromarray(gray).convert("LA").save(path)
        want = np.repeat(gray[..., None], 3, 2)
    else:  # CMYK JPEG
        path = os.path.join(root, "train", "000001.jpg")
        Image.fromarray(rgb).convert("CMYK").save(path, quality=100)
        os.remove(img(root, 1))
        edit(root, lambda d: d["images"][0].update(file_name="000001.jpg"))
        want = None
    report = check(pan(root))
    assert report.ok
    p = one(report, "converted_mode")
    assert p.path == path and p.ids == {"image_id": 1}
    loaded = build_dataset(pan(root), "train")[0]["image"].permute(1, 2, 0).numpy()
    if want is not None:
        assert np.array_equal(loaded, want)
    else:
        assert np.abs(loaded.astype(int) - rgb).mean() < 8


def _save_with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif.tobytes())


@pytest.mark.parametrize("case", ["rotated_stored", "annotated_on_stored", "upside_down"])
def test_exif_orientation(root, case):
    rgb = upright(root, 2)
    path = img(root, 2)
    if case == "rotated_stored":  # a camera's portrait: stored turned, the tag turns it back
        _save_with_orientation(path, np.ascontiguousarray(np.rot90(rgb, 1)), 6)  # stored 64x48
    elif case == "annotated_on_stored":  # the tag swaps H and W, the annotation did not
        _save_with_orientation(path, rgb, 6)
    else:
        _save_with_orientation(path, np.ascontiguousarray(rgb[::-1, ::-1]), 3)
    report = check(pan(root))
    assert report.ok
    p = one(report, "exif_orientation")
    assert p.path == path and p.ids == {"image_id": 2}
    assert ("not applied" in p.message) == (case == "annotated_on_stored")
    sample = build_dataset(pan(root), "train")[1]
    assert sample["image_id"] == 2 and (sample["height"], sample["width"]) == (H, W)
    assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), rgb)


def test_exif_orientation_matches_pillow(tmp_path):
    from PIL import ImageOps

    from proscale.data.files import read_image
    a = np.random.default_rng(0).integers(0, 255, (3, 5, 3), dtype=np.uint8)
    for o in range(1, 9):
        path = str(tmp_path / f"{o}.png")
        _save_with_orientation(path, a, o)
        want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        assert np.array_equal(read_image(path), want), o


# ---------------------------------------------------------------- JSON schema

def test_invalid_json(root):
    open(jpath(root), "wb").write(b'{"images": [1, 2,')
    report = check(pan(root))
    assert one(report, "invalid_json").path == jpath(root)


@pytest.mark.parametrize("case", ["missing_segments_info", "image_id_string", "bad_height",
                                  "images_not_list", "bad_categories", "segment_not_object",
                                  "bad_iscrowd"])
def test_schema_errors(root, case):
    def fn(d):
        if case == "missing_segments_info":
            del d["annotations"][1]["segments_info"]
        elif case == "image_id_string":
            d["images"][2]["id"] = "3"
        elif case == "bad_height":
            d["images"][0]["height"] = -4
        elif case == "images_not_list":
            d["images"] = {"id": 1}
        elif case == "bad_categories":
            del d["categories"][0]["name"]
            d["categories"][2]["color"] = [1, 2]
        elif case == "segment_not_object":
            d["annotations"][0]["segments_info"][1] = [3002, 3]
        else:
            d["annotations"][2]["segments_info"][0]["iscrowd"] = "no"
    fn_path = edit(root, fn)
    report = check(pan(root))
    schema = of(report, "schema")
    assert schema and all(p.path == fn_path for p in schema)
    ids = [p.ids for p in schema]
    if case == "missing_segments_info":
        assert ids == [{"image_id": 2}] and "segments_info" in schema[0].message
    elif case == "image_id_string":
        assert ids == [{"image_index": 2}]
        # its annotation now names an image id that no entry has
        assert one(report, "unknown_image_id").ids == {"image_id": 3}
    elif case == "bad_height":
        assert ids == [{"image_id": 1}] and "height" in schema[0].message
    elif case == "images_not_list":
        assert "'images' must be a list" in schema[0].message
    elif case == "bad_categories":  # every problem, not just the first
        assert ids == [{"category_index": 0}, {"category_id": 3}]
    elif case == "segment_not_object":
        assert ids == [{"image_id": 1, "segment_index": 1}]
    else:
        assert "iscrowd" in schema[0].message and schema[0].ids["image_id"] == 3


def test_unknown_category(root):
    def fn(d):
        d["annotations"][1]["segments_info"][0]["category_id"] = 77
    edit(root, fn)
    report = check(pan(root))
    p = one(report, "unknown_category")
    sid = json.load(open(jpath(root)))["annotations"][1]["segments_info"][0]["id"]
    assert p.path == jpath(root) and p.ids == {"image_id": 2, "segment_id": sid, "category_id": 77}


def test_instances_unknown_category_and_bad_annotations(root):
    def fn(d):
        d["annotations"][0]["category_id"] = 101  # a stuff id: not an instances category
        d["annotations"][4]["segmentation"] = 17
        del d["images"][2]["width"]
    path = edit(root, fn, "instances_train")
    report = check(ins(root))
    assert one(report, "unknown_category").ids == {"image_id": 1, "annotation_id": 1,
                                                   "category_id": 101}
    assert sorted(str(p.ids) for p in of(report, "schema")) == sorted(
        [str({"image_id": 2, "annotation_id": 5}), str({"image_id": 3})])
    assert all(p.path == path for p in report.errors)


# ---------------------------------------------------------------- PNG vs JSON

def test_png_segment_missing_from_json(root):
    ids = np.asarray(Image.open(png(root, 1))).astype(np.int64) @ np.array([1, 256, 65536])
    ids[0, 0] = 424242
    save_ids_png(png(root, 1), ids)
    p = one(check(pan(root)), "png_segment_not_in_json")
    assert p.path == png(root, 1) and p.ids == {"image_id": 1, "segment_id": 424242}


def test_json_segment_missing_from_png(root):
    def fn(d):
        d["annotations"][2]["segments_info"].append({"id": 999, "category_id": 1, "area": 0})
    edit(root, fn)
    p = one(check(pan(root)), "json_segment_not_in_png")
    assert p.path == png(root, 3) and p.ids == {"image_id": 3, "segment_id": 999}
    assert "zero area" in p.message


def test_area_mismatch(root):
    edit(root, lambda d: d["annotations"][0]["segments_info"][0].update(area=1))
    report = check(pan(root))
    assert report.ok and one(report, "area_mismatch").ids["image_id"] == 1


# ---------------------------------------------------------------- duplicate ids

def test_duplicate_image_id(root):
    edit(root, lambda d: d["images"].append(dict(d["images"][1], file_name="other.png")))
    p = one(check(pan(root)), "duplicate_image_id")
    assert p.path == jpath(root) and p.ids == {"image_id": 2}


def test_duplicate_panoptic_annotation(root):
    edit(root, lambda d: d["annotations"].append(dict(d["annotations"][0])))
    assert one(check(pan(root)), "duplicate_annotation_id").ids == {"image_id": 1}


def test_duplicate_annotation_id(root):
    edit(root, lambda d: d["annotations"][5].update(id=2), "instances_train")
    p = one(check(ins(root)), "duplicate_annotation_id")
    assert p.path == jpath(root, "instances_train")
    assert p.ids == {"image_id": 2, "annotation_id": 2} and "image 1" in p.message


def test_duplicate_segment_id(root):
    segs = json.load(open(jpath(root)))["annotations"][0]["segments_info"]
    first, second = segs[0]["id"], segs[1]["id"]
    edit(root, lambda d: d["annotations"][0]["segments_info"][1].update(id=first))
    report = check(pan(root))
    assert one(report, "duplicate_segment_id").ids == {"image_id": 1, "segment_id": first}
    # the PNG still has the renamed segment's pixels
    assert one(report, "png_segment_not_in_json").ids == {"image_id": 1, "segment_id": second}


def test_duplicate_category_id(root):
    edit(root, lambda d: d["categories"][1].update(id=1))
    report = check(pan(root))
    p = one(report, "duplicate_category_id")
    assert p.path == jpath(root) and p.ids == {"category_id": 1}
    with pytest.raises(AnnotationError, match="duplicate category"):
        build_dataset(pan(root), "train", defer_errors=True)  # a whole-file problem


# ---------------------------------------------------------------- empty / degenerate

def _set_segmentation(root, ann_index, seg, **extra):
    def fn(d):
        d["annotations"][ann_index]["segmentation"] = seg
        d["annotations"][ann_index].update(extra)
    edit(root, fn, "instances_train")


def test_zero_area_mask(root):
    _set_segmentation(root, 1, {"size": [H, W], "counts": [H * W]})
    report = check(ins(root))
    assert report.ok
    p = one(report, "empty_annotation")
    assert p.path == jpath(root, "instances_train") and p.ids == {"image_id": 1, "annotation_id": 2}
    assert len(build_dataset(ins(root), "train")[0]["labels"]) == 3  # the empty one dropped


def test_degenerate_polygon(root):
    _set_segmentation(root, 0, [[1, 1, 5, 5, 9, 9], [3, 3, 8, 3]])
    report = check(ins(root))
    assert report.ok
    assert [p.ids for p in of(report, "degenerate_polygon")] == [
        {"image_id": 1, "annotation_id": 1, "polygon_index": 0},
        {"image_id": 1, "annotation_id": 1, "polygon_index": 1}]
    assert one(report, "empty_annotation").ids == {"image_id": 1, "annotation_id": 1}


def test_out_of_bounds_polygon(root):
    poly = [-10, -10, 20, -10, 20, 20, -10, 20]
    _set_segmentation(root, 5, [poly])
    report = check(ins(root))
    assert report.ok
    p = one(report, "out_of_bounds")
    assert p.ids == {"image_id": 2, "annotation_id": 6, "polygon_index": 0}
    sample = build_dataset(ins(root), "train")[1]
    want = np.zeros((H, W), bool)
    want[:20, :20] = True
    assert any(np.array_equal(m.numpy(), want) for m in sample["masks"])


def test_far_out_of_bounds_polygon_is_clipped(root):
    _set_segmentation(root, 5, [[-1e15, -1e15, 1e15, -1e15, 1e15, 1e15, -1e15, 1e15]])
    report = check(ins(root))
    assert report.ok and one(report, "out_of_bounds")
    sample = build_dataset(ins(root), "train")[1]
    assert any(bool(m.all()) for m in sample["masks"])  # covers the whole image


@pytest.mark.parametrize("bbox,words", [([3, 4, 0, 5], "zero area"), ([50, 40, 100, 100], "leaves"),
                                        ("wide", "must be")])
def test_bad_bbox(root, bbox, words):
    edit(root, lambda d: d["annotations"][3].update(bbox=bbox), "instances_train")
    report = check(ins(root))
    assert report.ok
    p = one(report, "bad_bbox")
    assert words in p.message and p.ids == {"image_id": 1, "annotation_id": 4}


def test_bad_rle(root):
    _set_segmentation(root, 2, {"size": [H, W], "counts": "PPPP"})
    _set_segmentation(root, 6, {"size": [H + 1, W], "counts": [H * W]})
    report = check(ins(root))
    assert one(report, "schema").ids == {"image_id": 1, "annotation_id": 3}
    assert one(report, "size_mismatch").ids == {"image_id": 2, "annotation_id": 7}


# ---------------------------------------------------------------- sizes

def test_image_smaller_than_stride(tmp_path):
    root = tiny_panoptic(tmp_path, 16, 20)
    report = check(pan(root))
    assert report.ok
    p = one(report, "image_too_small")
    assert p.path == os.path.join(root, "train", "a.png") and p.ids == {"image_id": 7}


def test_extreme_aspect_ratio(tmp_path):
    root = tiny_panoptic(tmp_path, 40, 440)
    report = check(pan(root))
    assert report.ok and not of(report, "image_too_small")
    assert one(report, "extreme_aspect_ratio").ids == {"image_id": 7}


def test_image_size_differs_from_annotation(root):
    edit(root, lambda d: d["images"][1].update(height=50))
    p = one(check(pan(root)), "size_mismatch")
    assert p.path == img(root, 2) and p.ids == {"image_id": 2}
    assert "48x64" in p.message and "50x64" in p.message


def test_png_size_differs_from_image(root):
    Image.open(png(root, 3)).crop((0, 0, W, H - 8)).save(png(root, 3))
    p = one(check(pan(root)), "size_mismatch")
    assert p.path == png(root, 3) and p.ids == {"image_id": 3} and "40x64" in p.message


# ---------------------------------------------------------------- the whole report

def test_every_problem_listed_with_summary(root, capsys):
    os.remove(img(root, 1))
    edit(root, lambda d: (d["annotations"][1]["segments_info"][0].update(category_id=55),
                          d["images"].append({"id": 9, "file_name": "x.png"})))
    open(png(root, 3), "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    open(os.path.join(root, "panoptic_train", "stray.png"), "wb").write(b"")
    report = check(pan(root))
    assert report.counts() == {"corrupt_png": 1, "missing_image": 1, "unknown_category": 1,
                               "unannotated_image": 1, "unreferenced_file": 1}
    assert one(report, "unannotated_image").ids == {"image_id": 9}
    assert one(report, "unreferenced_file").path.endswith("stray.png")
    text = report.format()
    assert "summary: 3 error(s), 1 warning(s), 1 note(s)" in text
    assert "missing_image" in text and img(root, 1) in text
    # the JSON form holds the same
    d = report.to_dict()
    assert d["ok"] is False and d["summary"] == {"error": 3, "warning": 1, "note": 1}
    assert {p["kind"] for p in d["problems"]} == set(report.counts())
    json.dumps(d)


def test_workers_give_the_same_report(root):
    os.remove(img(root, 2))
    edit(root, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=55))
    serial = validate_dataset(pan(root), "train")
    parallel = validate_dataset(pan(root), "train", workers=2)
    assert [key(p) for p in serial.problems] == [key(p) for p in parallel.problems]
    assert len(serial.errors) == 2


# ---------------------------------------------------------------- semantic data sets

def write_semantic(root, labels, images=None):
    os.makedirs(os.path.join(root, "images", "training"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", "training"), exist_ok=True)
    for k, lab in enumerate(labels):
        image = np.stack([lab * 20] * 3, -1).astype(np.uint8) if images is None else images[k]
        Image.fromarray(image).save(os.path.join(root, "images", "training", f"im{k}.png"))
        Image.fromarray(lab.astype(np.uint8)).save(os.path.join(root, "annotations", "training",
                                                                f"im{k}.png"))
    json.dump({"categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]},
              open(os.path.join(root, "categories.json"), "w"))
    return f"semantic:{root}"


def test_semantic_problems(tmp_path):
    lab = np.zeros((40, 40), np.uint8)
    lab[:, 20:] = 1
    bad = lab.copy()
    bad[0, 0] = 9
    spec = write_semantic(str(tmp_path), [lab, bad, np.full((40, 40), 255, np.uint8), lab])
    label_dir = os.path.join(str(tmp_path), "annotations", "training")
    os.remove(os.path.join(label_dir, "im3.png"))
    shutil.copy(os.path.join(label_dir, "im0.png"), os.path.join(label_dir, "orphan.png"))
    rgba = np.zeros((40, 40, 4), np.uint8)
    Image.fromarray(rgba).save(os.path.join(str(tmp_path), "images", "training", "im0.png"))
    report = check(spec, "training")
    assert one(report, "unknown_category").path == os.path.join(label_dir, "im1.png")
    assert "[9]" in one(report, "unknown_category").message
    assert one(report, "empty_annotation").ids == {"image_id": 2, "file_name": "im2.png"}
    assert one(report, "missing_png").path == os.path.join(label_dir, "im3.png")
    assert one(report, "unreferenced_file").path == os.path.join(label_dir, "orphan.png")
    assert one(report, "converted_mode").ids == {"image_id": 0, "file_name": "im0.png"}
    with pytest.raises(MissingFileError):
        build_dataset(spec, "training")  # without defer_errors a missing label fails at once


def test_semantic_label_size_mismatch(tmp_path):
    lab = np.zeros((40, 40), np.uint8)
    spec = write_semantic(str(tmp_path), [lab], images=[np.zeros((40, 44, 3), np.uint8)])
    p = one(check(spec, "training"), "size_mismatch")
    assert p.path.endswith("im0.png") and "40x40" in p.message


# ---------------------------------------------------------------- command line

def test_cli_exit_codes_and_output(root, capsys, tmp_path):
    assert main(["--data", pan(root)]) == 0
    out = capsys.readouterr().out
    assert "summary: 0 error(s), 0 warning(s), 0 note(s): ok" in out and "[val]" in out

    os.remove(png(root, 2, "val"))
    assert main(["--data", pan(root), "--split", "train"]) == 0
    capsys.readouterr()
    assert main(["--data", pan(root), "--split", "val"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR   missing_png: {png(root, 2, 'val')}" in out and "image_id=2" in out
    assert "  error   missing_png" in out and "1 error(s)" in out

    assert main(["--data", pan(root), "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["counts"] == {"missing_png": 1} and d["problems"][0]["ids"] == {"image_id": 2}
    assert set(d["splits"]) == {"train", "val"}

    tiny = tiny_panoptic(tmp_path / "tiny", 16, 20)
    assert main(["--data", pan(tiny), "--split", "train"]) == 0  # warnings only
    assert main(["--data", pan(tiny), "--split", "train", "--strict"]) == 1
    capsys.readouterr()
    assert main(["--data", "cityscapes:/nowhere"]) == 2
    assert "kind" in capsys.readouterr().err


def test_cli_max_per_kind_and_registration(root, capsys):
    for i in (1, 2, 3):
        os.remove(img(root, i))
    assert main(["--data", pan(root), "--split", "train", "--max-per-kind", "1"]) == 1
    out = capsys.readouterr().out
    assert out.count("ERROR   missing_image") == 1 and "2 more missing_image" in out
    assert "  error   missing_image              3" in out
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    for name in ("validate-data", "validate"):  # the old name still works
        args = parser.parse_args([name, "--data", pan(root), "--json"])
        assert args.split == "all" and args.json and callable(args.func)


# ---------------------------------------------------------------- training-time hook

def test_skip_bad_samples(root):
    os.remove(img(root, 2))
    ds = build_dataset(pan(root), "train", defer_errors=True)
    stop = SkipBadSamples(ds)
    assert stop.metadata is ds.metadata and len(stop) == 3
    assert "skipped" not in stop[0]
    with pytest.raises(MissingFileError) as info:
        stop[1]
    assert img(root, 2) in str(info.value) and "image_id=2" in str(info.value)

    skip = SkipBadSamples(ds, skip=True, max_fraction=0.5)
    s = skip[1]
    assert s["image_id"] == 3  # the next index that loads
    assert s["skipped"] == skip.skipped and len(skip.skipped) == 1
    event = skip.skipped[0]
    assert (event["index"], event["substitute"], event["kind"], event["path"], event["ids"]) == \
        (1, 2, "missing_image", img(root, 2), {"image_id": 2})
    assert skip[0]["skipped"] == [] and skip[1]["image_id"] == 3  # known bad: no new event
    assert len(skip.skipped) == 1
    assert SkipBadSamples(ds, skip=True, max_fraction=0.5)[1]["image_id"] == 3  # deterministic

    loader = build_dataloader(SkipBadSamples(ds, skip=True, max_fraction=0.5), batch_size=3,
                              train=False)
    batch = next(iter(loader))
    assert batch["image_id"] == [1, 3, 3] and [len(e) for e in batch["skipped"]] == [0, 1, 0]


def test_skip_bad_samples_wraps_and_limits(root):
    os.remove(img(root, 3))
    ds = build_dataset(pan(root), "train", defer_errors=True)
    assert SkipBadSamples(ds, skip=True, max_fraction=0.5)[2]["image_id"] == 1  # wraps around
    os.remove(img(root, 1))
    limited = SkipBadSamples(ds, skip=True, max_fraction=0.1)
    assert limited[0]["image_id"] == 2  # one bad sample is always tolerated
    with pytest.raises(DataError, match="2 of 3 samples failed"):
        limited[2]


def test_defer_errors_lets_a_bad_record_be_skipped(root):
    edit(root, lambda d: d["annotations"][0]["segments_info"][0].update(category_id=55))
    with pytest.raises(AnnotationError, match="unknown category id 55"):
        build_dataset(pan(root), "train")
    ds = build_dataset(pan(root), "train", defer_errors=True)
    assert [p.kind for p in ds.problems] == ["unknown_category"]
    with pytest.raises(AnnotationError, match="unknown category id 55"):
        ds[0]
    s = SkipBadSamples(ds, skip=True, max_fraction=0.5)[0]
    assert s["image_id"] == 2 and s["skipped"][0]["kind"] == "unknown_category"


def test_data_error_survives_a_worker_process(root):
    os.remove(img(root, 1))
    ds = SkipBadSamples(build_dataset(pan(root), "train", defer_errors=True))
    loader = build_dataloader(ds, batch_size=1, train=False, num_workers=1)
    with pytest.raises(DataError) as info:  # torch rebuilds it from the message alone
        list(loader)
    assert img(root, 1) in str(info.value)


def test_errors_pickle_and_convert():
    e = ImageError("/x/a.png", "cannot decode image", kind="corrupt_image", image_id=3)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is ImageError and str(back) == str(e) and back.ids == {"image_id": 3}
    assert back.kind == "corrupt_image" and back.problems[0].path == "/x/a.png"
    assert str(DataError("whole message")) == "whole message"
    p = Problem.make("missing_png", "/x/b.png", "panoptic PNG not found", image_id=4, other=None)
    assert p.ids == {"image_id": 4} and isinstance(p.to_error(), MissingFileError)
    assert str(p.to_error()) == str(p) == "/x/b.png: panoptic PNG not found (image_id=4)"
    assert pickle.loads(pickle.dumps(p)) == p


# ------------------------------------------------------------------ segments per image, object sizes
def test_segment_counts_and_size_warnings():
    from proscale.data.stats import SegmentStats, segment_stats, size_warnings

    class Fake:  # a COCO panoptic data set's records: one image of 40 segments of 6x6 px, one of 2
        records = [{"image": {"height": 256, "width": 256},
                    "annotation": {"segments_info": [{"area": 36} for _ in range(40)] + [{"area": 900, "iscrowd": 1}]}},
                   {"image": {"height": 256, "width": 256}, "annotation": {"segments_info": [{"area": 900}] * 2}}]

    stats = segment_stats(Fake())
    assert stats.counts == [40, 2] and stats.summary()["max"] == 40  # the crowd region is not a segment
    warnings = size_warnings(stats, num_queries=20)
    assert len(warnings) == 2
    assert "1 of 2 images have more segments than the model's 20 queries" in warnings[0]
    assert "decoder.num_queries=" in warnings[0] and int(warnings[0].rsplit("=", 1)[1]) >= 40
    assert "smaller than 8 px" in warnings[1]  # 40 of 42 segments are 6 px across
    assert size_warnings(stats, num_queries=100, train_size=1024) == []  # 4x larger: 24 px
    assert segment_stats(object()) is None and SegmentStats().describe().startswith("segments per image")


def test_validate_data_cli_warns_when_queries_cannot_hold_the_segments(synth_src, capsys):
    from proscale.data.validate import main

    assert main(["--data", f"synthetic:{synth_src}", "--split", "val", "--queries", "1"]) == 0
    out = capsys.readouterr().out
    assert "segments per image: mean" in out
    assert "WARNING [val]" in out and "queries" in out and "decoder.num_queries=" in out
