"""proscale.data: loaders against files the tests write, transforms, batching, bad input."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from proscale.data import (SYNTHETIC_CATEGORIES, AnnotationError, CocoInstancesDataset,
                           CocoPanopticDataset, DataError, FixedSizeCrop, ImageError,
                           MissingFileError, RandomFlip, ResizeShortestEdge,
                           ResumableBatchSampler, ScaleJitter, SemanticDataset, TransformConfig,
                           build_dataloader, build_dataset, build_transforms, collate,
                           Category, DatasetMetadata, generate_synthetic, mix_seed, read_sem_seg,
                           set_epoch)
from proscale.data.transforms import Compose


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(str(tmp_path_factory.mktemp("synth")), num_train=6, num_val=3,
                              image_size=(64, 80), seed=3)


def read_ids(path):
    rgb = np.asarray(Image.open(path)).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------- synthetic data

def test_synthetic_same_seed_same_bytes(tmp_path):
    a = generate_synthetic(str(tmp_path / "a"), 4, 2, image_size=48, seed=7)
    b = generate_synthetic(str(tmp_path / "b"), 4, 2, image_size=48, seed=7)
    c = generate_synthetic(str(tmp_path / "c"), 4, 2, image_size=48, seed=8)
    fa, fb, fc = all_files(a), all_files(b), all_files(c)
    assert fa == fb
    assert "train/000001.jpg" in fa and "panoptic_val/000002.png" in fa
    assert fa["train/000001.jpg"] != fc["train/000001.jpg"]
    # train and val are drawn independently
    assert fa["train/000001.jpg"] != fa["val/000001.jpg"]


def test_synthetic_is_fast(tmp_path):
    t = time.perf_counter()
    generate_synthetic(str(tmp_path), 56, 8, image_size=(128, 128), seed=0, image_format="png")
    assert time.perf_counter() - t < 10.0  # ~1 s unloaded; generous for a busy machine


def test_synthetic_content(synth):
    data = json.load(open(os.path.join(synth, "annotations", "panoptic_train.json")))
    thing_ids = {c.id for c in SYNTHETIC_CATEGORIES if c.isthing}
    for ann in data["annotations"]:
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        stuff = [s for s in ann["segments_info"] if s["category_id"] not in thing_ids]
        assert 1 <= len(things) <= 4 and 1 <= len(stuff) <= 3
        ids = read_ids(os.path.join(synth, "panoptic_train", ann["file_name"]))
        for s in ann["segments_info"]:
            assert (ids == s["id"]).sum() == s["area"]
    with pytest.raises(ValueError, match="difficulty"):
        generate_synthetic(synth + "_x", 1, 1, difficulty="impossible")


# ---------------------------------------------------------------- metadata

def test_metadata_maps_and_palette():
    meta = DatasetMetadata([Category(17, "cat"), Category(3, "grass", isthing=False),
                            Category(9, "dog", color=(1, 2, 3))])
    assert meta.dataset_id_to_contiguous == {17: 0, 3: 1, 9: 2}
    assert meta.contiguous_to_dataset_id == {0: 17, 1: 3, 2: 9}
    assert meta.thing_classes == [0, 2] and meta.stuff_classes == [1]
    assert meta.colors[2] == (1, 2, 3) and meta.colors[0] != meta.colors[1]
    assert meta.colors == DatasetMetadata([Category(17, "cat"), Category(3, "grass"),
                                           Category(9, "dog", color=(1, 2, 3))]).colors
    lut, known = meta.sem_seg_lut(), meta.sem_seg_known()
    assert (lut[17], lut[3], lut[9], lut[255]) == (0, 1, 2, 255) and not known[0] and known[255]
    with pytest.raises(DataError, match="duplicate"):
        DatasetMetadata([Category(1, "a"), Category(1, "b")])


# ---------------------------------------------------------------- COCO panoptic

def test_panoptic_targets_match_png(synth):
    ds = build_dataset(f"synthetic:{synth}", "train")
    meta = ds.metadata
    assert [c.id for c in meta.categories] == [c.id for c in SYNTHETIC_CATEGORIES]
    assert meta.thing_classes == [0, 1, 2, 3, 4] and meta.stuff_classes == [5, 6, 7]
    assert meta.contiguous(101) == 5 and meta.dataset_id(7) == 103
    assert meta.panoptic_json.endswith("panoptic_train.json") and meta.instances_json
    data = json.load(open(meta.panoptic_json))
    assert len(ds) == 6
    for i, ann in enumerate(data["annotations"]):
        s = ds[i]
        ids = read_ids(os.path.join(synth, "panoptic_train", ann["file_name"]))
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 80)
        assert (s["height"], s["width"]) == (64, 80) and s["image_id"] == ann["image_id"]
        assert s["masks"].dtype == torch.bool and s["labels"].dtype == torch.int64
        want = np.stack([ids == seg["id"] for seg in ann["segments_info"]])
        assert np.array_equal(s["masks"].numpy(), want)
        assert s["labels"].tolist() == [meta.contiguous(seg["category_id"]) for seg in ann["segments_info"]]
    # semantic ground truth written beside it agrees with the panoptic one
    sem = read_sem_seg(meta.sem_seg_path(ds[0]["file_name"]), meta)
    s = ds[0]
    for m, label in zip(s["masks"].numpy(), s["labels"].tolist()):
        assert (sem[m] == label).all()


def write_panoptic(root, segments, pixels, categories=None, image=True, png=True):
    """A one-image COCO panoptic set: `pixels` int (H, W) of segment ids."""
    h, w = pixels.shape
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "panoptic_train"), exist_ok=True)
    if image:
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(os.path.join(root, "train", "a.jpg"))
    if png:
        rgb = np.stack([pixels % 256, pixels // 256 % 256, pixels // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, "panoptic_train", "a.png"))
    categories = categories or [{"id": 7, "name": "thing", "isthing": 1},
                                {"id": 3, "name": "stuff", "isthing": 0}]
    data = {"images": [{"id": 42, "file_name": "a.jpg", "height": h, "width": w}],
            "annotations": [{"image_id": 42, "file_name": "a.png", "segments_info": segments}],
            "categories": categories}
    path = os.path.join(root, "annotations", "panoptic_train.json")
    json.dump(data, open(path, "w"))
    return path


def tiny_pixels():
    px = np.full((8, 10), 70000, np.int64)  # stuff, id spans the B channel
    px[1:4, 1:4] = 5  # thing
    px[5:7, 6:9] = 300  # crowd thing
    px[0, 9] = 0  # void
    return px


TINY_SEGMENTS = [{"id": 5, "category_id": 7, "iscrowd": 0},
                 {"id": 300, "category_id": 7, "iscrowd": 1},
                 {"id": 70000, "category_id": 3}]


def test_panoptic_crowd_dropped_and_order(tmp_path):
    write_panoptic(str(tmp_path), TINY_SEGMENTS, tiny_pixels())
    s = CocoPanopticDataset(str(tmp_path), "train")[0]
    assert s["labels"].tolist() == [0, 1]  # contiguous in JSON category order; crowd gone
    assert s["masks"][0].sum() == 9 and s["masks"][1].sum() == 80 - 9 - 6 - 1
    kept = CocoPanopticDataset(str(tmp_path), "train", keep_crowd=True)[0]
    assert kept["labels"].tolist() == [0, 0, 1] and kept["masks"][1].sum() == 6


def test_panoptic_split_alias(tmp_path):
    write_panoptic(str(tmp_path), TINY_SEGMENTS, tiny_pixels())
    for d in ("train", "panoptic_train"):
        os.rename(tmp_path / d, tmp_path / (d + "2017"))
    os.rename(tmp_path / "annotations" / "panoptic_train.json",
              tmp_path / "annotations" / "panoptic_train2017.json")
    assert len(CocoPanopticDataset(str(tmp_path), "train")) == 1


def test_panoptic_png_folder_in_either_layout(tmp_path):
    """detectron2's layout (panoptic_{split}/ at the root) and the official COCO zip's
    (annotations/panoptic_{split}/) give the same samples; neither names both paths."""
    write_panoptic(str(tmp_path), TINY_SEGMENTS, tiny_pixels())
    root = str(tmp_path)
    flat = CocoPanopticDataset(root, "train")
    assert flat.png_dir == os.path.join(root, "panoptic_train")
    a = flat[0]
    os.rename(tmp_path / "panoptic_train", tmp_path / "annotations" / "panoptic_train")
    official = build_dataset(f"coco-panoptic:{root}", "train")
    assert official.png_dir == official.metadata.panoptic_root == os.path.join(root, "annotations", "panoptic_train")
    b = official[0]
    assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
    os.rename(tmp_path / "annotations" / "panoptic_train", tmp_path / "elsewhere")
    with pytest.raises(MissingFileError) as err:
        CocoPanopticDataset(root, "train")
    message = str(err.value)
    assert os.path.join(root, "panoptic_train") in message
    assert os.path.join(root, "annotations", "panoptic_train") in message


def _break_json(root):
    path = os.path.join(root, "annotations", "panoptic_train.json")
    open(path, "w").write('{"images": [')
    return path


@pytest.mark.parametrize("case", ["missing_image", "broken_json", "unknown_category",
                                  "png_id_not_listed", "listed_id_not_in_png", "missing_png",
                                  "png_wrong_size"])
def test_panoptic_bad_input(tmp_path, case):
    root = str(tmp_path)
    segments = [dict(s) for s in TINY_SEGMENTS]
    px = tiny_pixels()
    kwargs = {}
    if case == "missing_image":
        kwargs["image"] = False
        bad, err, ids = os.path.join(root, "train", "a.jpg"), MissingFileError, ["image_id=42"]
    elif case == "broken_json":
        bad, err, ids = None, AnnotationError, []
    elif case == "unknown_category":
        segments[0]["category_id"] = 99
        bad, err, ids = os.path.join(root, "annotations", "panoptic_train.json"), AnnotationError, ["99", "segment_id=5"]
    elif case == "png_id_not_listed":
        px[7, 0] = 1234
        bad, err, ids = os.path.join(root, "panoptic_train", "a.png"), AnnotationError, ["segment_id=1234"]
    elif case == "listed_id_not_in_png":
        segments.append({"id": 77, "category_id": 7})
        bad, err, ids = os.path.join(root, "panoptic_train", "a.png"), AnnotationError, ["segment_id=77"]
    elif case == "missing_png":
        kwargs["png"] = False
        bad, err, ids = os.path.join(root, "panoptic_train", "a.png"), MissingFileError, ["image_id=42"]
    else:
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(os.path.join(root, "x.png"))
        bad, err, ids = os.path.join(root, "panoptic_train", "a.png"), ImageError, ["3x3"]
    write_panoptic(root, segments, px, **kwargs)
    if case == "broken_json":
        bad = _break_json(root)
    if case == "png_wrong_size":
        os.replace(os.path.join(root, "x.png"), bad)
    with pytest.raises(err) as info:
        CocoPanopticDataset(root, "train")[0]
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)
    assert bad in str(info.value)
    for text in ids:
        assert text in str(info.value)


# ---------------------------------------------------------------- COCO instances

def write_instances(root, anns, h=12, w=10, image=True):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "val"), exist_ok=True)
    if image:
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(os.path.join(root, "val", "b.png"))
    data = {"images": [{"id": 1, "file_name": "b.png", "height": h, "width": w}],
            "annotations": anns,
            "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]}
    path = os.path.join(root, "annotations", "instances_val.json")
    json.dump(data, open(path, "w"))
    return path


def test_instances_polygon_and_rle(tmp_path):
    h, w = 12, 10
    box = np.zeros((h, w), np.uint8)
    box[2:7, 3:8] = 1
    blob = np.zeros((h, w), np.uint8)
    blob[8:11, 0:4] = 1
    blob[9, 6] = 1
    compressed = mask_utils.encode(np.asfortranarray(blob))
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = box.T.flatten()
    runs, last, n = [], 0, 0
    for v in flat:
        if v != last:
            runs.append(n)
            last, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        # polygon around pixels x 3..7, y 2..6 (pycocotools' pixel-corner convention)
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[3, 2, 8, 2, 8, 7, 3, 7], [0, 0, 1, 1]]},
        {"id": 2, "image_id": 1, "category_id": 18, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": compressed["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 18, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": runs}},
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": runs}},
    ]
    write_instances(str(tmp_path), anns)
    ds = CocoInstancesDataset(str(tmp_path), "val")
    assert ds.metadata.class_names == ["dog", "person"] and ds.metadata.thing_classes == [0, 1]
    s = ds[0]
    assert s["labels"].tolist() == [1, 0, 0]  # crowd left out
    assert np.array_equal(s["masks"][0].numpy(), box.astype(bool))
    assert np.array_equal(s["masks"][1].numpy(), blob.astype(bool))
    assert np.array_equal(s["masks"][2].numpy(), box.astype(bool))
    assert len(CocoInstancesDataset(str(tmp_path), "val", keep_crowd=True)[0]["labels"]) == 4


@pytest.mark.parametrize("case", ["broken_json", "unknown_category", "missing_image", "bad_rle_size",
                                  "odd_polygon"])
def test_instances_bad_input(tmp_path, case):
    root = str(tmp_path)
    ann = {"id": 9, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]]}
    image = True
    if case == "unknown_category":
        ann["category_id"] = 5
    if case == "missing_image":
        image = False
    if case == "bad_rle_size":
        ann["segmentation"] = {"size": [3, 3], "counts": [9]}
    if case == "odd_polygon":
        ann["segmentation"] = [[0, 0, 4, 0, 4]]
    path = write_instances(root, [ann], image=image)
    if case == "broken_json":
        open(path, "w").write("{not json")
    if case == "missing_image":
        path = os.path.join(root, "val", "b.png")
    with pytest.raises(DataError) as info:
        CocoInstancesDataset(root, "val")[0]
    assert path in str(info.value)
    if case in ("unknown_category", "bad_rle_size", "odd_polygon"):
        assert "annotation_id=9" in str(info.value)


def test_instances_from_synthetic_match_panoptic(synth):
    pan = CocoPanopticDataset(synth, "val")
    ins = CocoInstancesDataset(synth, "val")
    for i in range(len(pan)):
        p, q = pan[i], ins[i]
        things = p["labels"] < 5
        assert torch.equal(p["masks"][things], q["masks"]) and torch.equal(p["labels"][things], q["labels"])


# ---------------------------------------------------------------- semantic

def write_semantic(root, labels, split="training", categories=None, ade=False):
    os.makedirs(os.path.join(root, "images", split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
    for k, lab in enumerate(labels):
        img = np.stack([lab * 20] * 3, -1).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, "images", split, f"im{k}.jpg"))
        Image.fromarray(lab.astype(np.uint8)).save(os.path.join(root, "annotations", split, f"im{k}.png"))
    if ade:
        rows = ["Idx\tRatio\tTrain\tVal\tName", "1\t0.1\t1\t1\twall", "2\t0.1\t1\t1\tbuilding;edifice",
                "3\t0.1\t1\t1\tsky"]
        open(os.path.join(root, "objectInfo150.txt"), "w").write("\n".join(rows) + "\n")
    elif categories is not None:
        json.dump({"categories": categories}, open(os.path.join(root, "categories.json"), "w"))


def test_semantic_ignore_and_masks(tmp_path):
    lab = np.array([[0, 0, 2, 255], [2, 2, 255, 255], [0, 2, 2, 0]])
    write_semantic(str(tmp_path), [lab], categories=[{"id": 0, "name": "a"}, {"id": 1, "name": "b"},
                                                     {"id": 2, "name": "c"}])
    ds = build_dataset(f"semantic:{tmp_path}", "train")  # finds "training"
    s = ds[0]
    assert torch.equal(s["sem_seg"], torch.from_numpy(lab).long())
    assert s["labels"].tolist() == [0, 2]
    assert torch.equal(s["masks"][0], s["sem_seg"] == 0) and torch.equal(s["masks"][1], s["sem_seg"] == 2)
    assert ds.metadata.stuff_classes == [0, 1, 2]
    batch = collate([s, s])
    assert len(batch["sem_seg"]) == 2 and set(batch["targets"][0]) == {"labels", "masks"}


def test_semantic_reduce_zero_label(tmp_path):
    lab = np.array([[0, 1, 2], [3, 3, 0]])
    write_semantic(str(tmp_path), [lab], ade=True)
    ds = SemanticDataset(str(tmp_path), "train")
    assert ds.metadata.class_names == ["wall", "building", "sky"]
    want = np.array([[255, 0, 1], [2, 2, 255]])
    assert np.array_equal(ds[0]["sem_seg"].numpy(), want)
    assert ds[0]["labels"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("case", ["unknown_value", "missing_label", "no_categories"])
def test_semantic_bad_input(tmp_path, case):
    root = str(tmp_path)
    cats = [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]
    lab = np.array([[0, 1], [1, 7 if case == "unknown_value" else 0]])
    write_semantic(root, [lab], categories=None if case == "no_categories" else cats)
    path = os.path.join(root, "annotations", "training", "im0.png")
    if case == "missing_label":
        os.remove(path)
    if case == "no_categories":
        path = os.path.join(root, "categories.json")
    with pytest.raises(DataError) as info:
        SemanticDataset(root, "training")[0]
    assert path in str(info.value)
    if case == "unknown_value":
        assert "[7]" in str(info.value)


# ---------------------------------------------------------------- transforms

def painted_sample(h=60, w=84, seed=0):
    """Image whose colour encodes the segment: (40 + 50 k) in channel 0 for mask k."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0, 5:30, 4:40] = True
    masks[1, 30:55, 50:80] = True
    masks[2, 2:12, 60:75] = True
    masks[3] = ~masks[:3].any(0)
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    for k in range(4):
        image[0][masks[k]] = 40 + 50 * k
    image[1] = torch.randint(0, 255, (h, w), generator=g, dtype=torch.uint8)  # unrelated noise
    sem = torch.zeros(h, w, dtype=torch.long)
    for k in range(4):
        sem[masks[k]] = k
    return {"image": image, "masks": masks, "labels": torch.arange(4), "sem_seg": sem}


def check_aligned(sample, max_bad_fraction=0.0):
    img0 = sample["image"][0].long()
    valid = sample["sem_seg"] != 255
    for m, label in zip(sample["masks"], sample["labels"].tolist()):
        assert m.any()
        want = 40 + 50 * label
        bad = ((img0 - want).abs() > 10) & m
        assert bad.sum() <= max_bad_fraction * m.sum() + 1e-9
        assert torch.equal(m, (sample["sem_seg"] == label))
    # padded area: no mask covers it
    covered = sample["masks"].any(0)
    assert torch.equal(covered, valid)


def test_flip_and_crop_exactly_aligned():
    torch.manual_seed(0)
    for _ in range(10):
        s = Compose([RandomFlip(0.5), FixedSizeCrop((40, 100), pad_value=128)])(painted_sample())
        assert s["image"].shape == (3, 40, 100) and s["masks"].shape[1:] == (40, 100)
        check_aligned(s)
        assert (s["image"][:, :, 84:] == 128).all() and (s["sem_seg"][:, 84:] == 255).all()


def test_flip_moves_everything():
    s = painted_sample()
    out = RandomFlip(prob=1.0)(s)
    assert torch.equal(out["image"], s["image"].flip(-1)) and torch.equal(out["masks"], s["masks"].flip(-1))
    assert torch.equal(out["sem_seg"], s["sem_seg"].flip(-1))


def test_resize_keeps_alignment():
    torch.manual_seed(1)
    for t in (ScaleJitter(0.3, 2.0, 64), ResizeShortestEdge(97, 1000), ResizeShortestEdge(23, 30)):
        s = t(painted_sample())
        label_of = torch.full(s["sem_seg"].shape, -1)
        for m, label in zip(s["masks"], s["labels"].tolist()):
            assert m.any() and torch.equal(m, s["sem_seg"] == label)
            label_of[m] = label
        assert (label_of >= 0).all()  # masks still tile the image
        # Away from boundaries (5x5 neighbourhood of one label) the bilinear image must show
        # the colour of the nearest-resized mask; a half-pixel shift would break this.
        lo = -torch.nn.functional.max_pool2d(-label_of[None, None].float(), 5, 1, 2)[0, 0]
        hi = torch.nn.functional.max_pool2d(label_of[None, None].float(), 5, 1, 2)[0, 0]
        interior = lo == hi
        assert interior.float().mean() > 0.3
        diff = (s["image"][0].long() - (40 + 50 * label_of)).abs()
        assert diff[interior].max() <= 2, t


def test_resize_shortest_edge_sizes():
    t = ResizeShortestEdge(800, 1333)
    assert t.output_size(480, 640, 800) == (800, 1067)
    assert t.output_size(300, 1200, 800) == (333, 1333)


def test_crop_drops_removed_instances():
    dropped = 0
    torch.manual_seed(2)
    for _ in range(20):
        s = FixedSizeCrop(24)(painted_sample())
        assert len(s["labels"]) == len(s["masks"]) and all(m.any() for m in s["masks"])
        dropped += len(s["labels"]) < 4
    assert dropped > 0


def test_build_transforms():
    cfg = TransformConfig(image_size=64, min_scale=0.5, max_scale=1.5)
    train = build_transforms(True, cfg)
    s = train(painted_sample())
    assert s["image"].shape == (3, 64, 64)
    test = build_transforms(False, TransformConfig(min_size_test=30, max_size_test=100))
    assert test(painted_sample())["image"].shape == (3, 30, 42)
    assert len(build_transforms(False, TransformConfig(min_size_test=0)).transforms) == 0
    with pytest.raises(ValueError, match="augmentation"):
        build_transforms(True, TransformConfig(augmentation="mosaic"))


# ---------------------------------------------------------------- batching

def test_collate_layout(synth):
    ds = build_dataset(f"synthetic:{synth}", "val")
    batch = collate([ds[0], ds[1]])
    assert len(batch["images"]) == 2 and batch["images"][0].shape == (3, 64, 80)
    assert set(batch["targets"][0]) == {"labels", "masks"}
    assert batch["image_id"] == [1, 2] and batch["height"] == [64, 64]
    assert batch["file_name"][0].endswith("val/000001.jpg")


def test_dataloader_deterministic_and_resumable(synth):
    tf = build_transforms(True, TransformConfig(image_size=48, min_scale=0.5, max_scale=1.5))
    ds = build_dataset(f"synthetic:{synth}", "train", tf)

    def epoch(loader, e, start=0):
        set_epoch(loader, e, start)
        return [(b["image_id"], [im.sum().item() for im in b["images"]]) for b in loader]

    a = build_dataloader(ds, batch_size=2, train=True, num_workers=0, seed=5)
    b = build_dataloader(ds, batch_size=2, train=True, num_workers=0, seed=5)
    e0 = epoch(a, 0)
    assert len(e0) == 3 and e0 == epoch(b, 0)
    assert epoch(b, 0, start=1) == e0[1:]  # resume mid-epoch: same batches, same augmentation
    assert epoch(a, 1) != e0  # a new order (and new augmentations) each epoch
    assert sorted(i for ids, _ in e0 for i in ids) == list(range(1, 7))
    assert len(a.batch_sampler) == 3
    assert a.dataset.metadata is ds.metadata
    # a worker process draws the same augmentations as the main process
    assert epoch(build_dataloader(ds, batch_size=2, train=True, num_workers=1, seed=5), 0) == e0


def test_mix_seed_values_are_pinned():
    # Every shuffle and augmentation seed comes from mix_seed, so these exact values are what
    # makes a resumed run replay the batches it was saved with: they must never change.
    cases = {(): 0, (0,): 8147104208329303767, (0, 0): 6017775124710473527,
             (1, 2, 3): 7510213797696614745, (0, 0, 5): 4088386893299428346,
             (-1,): 8245168133484221968, (2**64 + 7, 3): 3879072848308665546}
    assert {values: mix_seed(*values) for values in cases} == cases
    assert mix_seed(2**64 + 7) == mix_seed(7) and mix_seed(-1) == mix_seed(2**64 - 1)  # mod 2^64
    seeds = [mix_seed(5, 0, p) for p in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)  # order matters: (seed, epoch) differs from (epoch, seed)


def test_sampler_seeds_come_from_mix_seed():
    sampler = ResumableBatchSampler(5, 2, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(4)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(mix_seed(3, 4))).tolist()
    assert list(sampler) == [[(order[p], mix_seed(3, 4, p)) for p in (0, 1)],
                             [(order[p], mix_seed(3, 4, p)) for p in (2, 3)]]


def test_sampler_shards_ranks():
    shards = [list(ResumableBatchSampler(7, 2, shuffle=True, seed=1, drop_last=True,
                                         num_replicas=2, rank=r)) for r in range(2)]
    idx = [[i for batch in s for i, _ in batch] for s in shards]
    assert len(idx[0]) == len(idx[1]) == 4
    assert set(idx[0]) | set(idx[1]) == set(range(7))
    evals = [[i for batch in ResumableBatchSampler(7, 3, shuffle=False, num_replicas=2, rank=r)
              for i, _ in batch] for r in range(2)]
    assert sorted(evals[0] + evals[1]) == list(range(7))  # evaluation sees each image once


def test_build_dataset_specs(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        build_dataset("cityscapes:/x", "train")
    with pytest.raises(ValueError, match="kind"):
        build_dataset("/just/a/path", "train")
    with pytest.raises(MissingFileError, match="generate_synthetic"):
        build_dataset(f"synthetic:{tmp_path}", "train")


def test_validate_command(synth, tmp_path, capsys):
    from proscale.data.validate import validate
    n, errors = validate(f"synthetic:{synth}", "val")
    assert n == 3 and errors == []
    write_panoptic(str(tmp_path), TINY_SEGMENTS + [{"id": 77, "category_id": 7}], tiny_pixels())
    _, errors = validate(f"coco-panoptic:{tmp_path}", "train")
    assert len(errors) == 1 and "segment_id=77" in errors[0]
    assert "circle" in capsys.readouterr().out
