"""Property tests: malformed annotation files and random bytes as images / PNGs give the
loaders and the validator only clear, typed errors (DataError subclasses naming the file),
never a KeyError / TypeError / IndexError / Pillow error, a crash or a hang."""
from __future__ import annotations

import copy
import io
import json
import os
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from proscale.data import (CocoInstancesDataset, CocoPanopticDataset, DataError,
                           SemanticDataset, decode_segmentation)
from proscale.data.files import decode_image, decode_label_png, decode_panoptic_png, load_json
from proscale.data.validate import validate_dataset

# PROSCALE_PROPERTY_EXAMPLES=2000 for a long hunt; the suite keeps 40 (a few seconds).
SETTINGS = settings(max_examples=int(os.environ.get("PROSCALE_PROPERTY_EXAMPLES", 40)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])
H, W = 12, 16
KEYS = ["images", "annotations", "categories", "id", "file_name", "height", "width", "image_id",
        "segments_info", "category_id", "segmentation", "iscrowd", "area", "bbox", "name",
        "isthing", "color", "size", "counts", "reduce_zero_label"]


@pytest.fixture(autouse=True)
def no_hang():
    """Fails a test that runs past 50 s (a hang), instead of blocking the suite."""
    if os.environ.get("PROSCALE_PROPERTY_EXAMPLES"):
        yield
        return
    def alarm(signum, frame):
        raise TimeoutError("test ran past 50 s: a loader hangs")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(50)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


scalars = (st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40)
           | st.sampled_from([0, 1, -1, 2, 3, 7, H, W, 10 ** 12, 0.5, float("nan"), float("inf")])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)
           | st.sampled_from(["a.png", "b.png", "", "../x", "/abs.png", "RLE", "0"]))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children,
                                        max_size=5)),
    max_leaves=25)


# ---------------------------------------------------------------- fixtures on disk

def _png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
IDS = np.zeros((H, W), np.int64)
IDS[:, W // 2:] = 2
IDS[:, : W // 2] = 1


def valid_panoptic() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "annotations": [{"image_id": 1, "file_name": "a.png",
                             "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0,
                                                "area": H * W // 2, "bbox": [0, 0, W // 2, H]},
                                               {"id": 2, "category_id": 2}]},
                            {"image_id": 2, "file_name": "b.png",
                             "segments_info": [{"id": 1, "category_id": 2},
                                               {"id": 2, "category_id": 2}]}],
            "categories": [{"id": 1, "name": "thing", "isthing": 1, "color": [1, 2, 3]},
                           {"id": 2, "name": "stuff", "isthing": 0}]}


def valid_instances() -> dict:
    rle = mask_utils.encode(np.asfortranarray((IDS == 2).astype(np.uint8)))
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[1, 1, 6, 1, 6, 8, 1, 8]], "area": 35,
                             "bbox": [1, 1, 5, 7]},
                            {"id": 2, "image_id": 2, "category_id": 2, "iscrowd": 0,
                             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
                            {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 1,
                             "segmentation": {"size": [H, W], "counts": [H * W // 2, H * W // 2]}}],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("props"))
    for d in ("annotations", "train", "panoptic_train"):
        os.makedirs(os.path.join(root, d))
    for name in ("a.png", "b.png"):
        open(os.path.join(root, "train", name), "wb").write(_png_bytes(IMAGE))
        rgb = np.stack([IDS % 256, IDS // 256 % 256, IDS // 65536], -1).astype(np.uint8)
        open(os.path.join(root, "panoptic_train", name), "wb").write(_png_bytes(rgb))
    return root


def write(root, name, content) -> str:
    path = os.path.join(root, "annotations", name)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def assert_clear(err: DataError) -> None:
    assert isinstance(err, DataError), type(err)
    assert err.path and err.path in str(err) and str(err).startswith(err.path)
    assert err.problems and err.problems[0].is_error


def exercise(cls, root: str, spec: str) -> None:
    """Builds the data set strictly and leniently, reads every sample, validates: only
    DataErrors may come out, and every problem names a file."""
    for defer in (False, True):
        try:
            ds = cls(root, "train", defer_errors=defer)
        except DataError as e:
            assert_clear(e)
            continue
        for i in range(len(ds)):
            try:
                sample = ds[i]
            except DataError as e:
                assert_clear(e)
                continue
            assert sample["masks"].shape[0] == sample["labels"].shape[0]
            assert sample["masks"].shape[1:] == sample["image"].shape[1:]
    report = validate_dataset(spec, "train")
    for p in report.problems:
        assert p.path and str(p).startswith(p.path) and p.severity in ("error", "warning", "note")


# ---------------------------------------------------------------- JSON


def _paths(value, prefix=()):
    """Every (container path) in a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, make):
    """A valid COCO dict with 1-3 random edits: a value replaced, a key / item deleted."""
    doc = make()
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    return doc


@SETTINGS
@given(doc=mutated(valid_panoptic))
def test_panoptic_mutated_json(base, doc):
    write(base, "panoptic_train.json", doc)
    exercise(CocoPanopticDataset, base, f"coco-panoptic:{base}")


@SETTINGS
@given(doc=mutated(valid_instances))
def test_instances_mutated_json(base, doc):
    write(base, "instances_train.json", doc)
    exercise(CocoInstancesDataset, base, f"coco-instances:{base}")


@SETTINGS
@given(doc=json_values, task=st.sampled_from(["panoptic", "instances"]))
def test_random_json_documents(base, doc, task):
    if isinstance(doc, dict) and draw_like_coco(doc):
        doc = {**valid_panoptic(), **doc}
    write(base, f"{task}_train.json", doc)
    cls = CocoPanopticDataset if task == "panoptic" else CocoInstancesDataset
    exercise(cls, base, f"coco-{task}:{base}")


def draw_like_coco(doc: dict) -> bool:
    return len(doc) % 2 == 0  # half the dicts keep a valid skeleton around the random keys


@SETTINGS
@given(content=st.binary(max_size=200)
       | st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000,
                          b'{"images": NaN}']))
def test_garbage_json_bytes(base, content):
    path = write(base, "panoptic_train.json", content)
    try:
        data = load_json(path)
    except DataError as e:
        assert_clear(e)
        assert e.path == path and e.kind == "invalid_json"
        return
    assert isinstance(data, dict)
    exercise(CocoPanopticDataset, base, f"coco-panoptic:{base}")


# ---------------------------------------------------------------- bytes as images

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
         b"P6\n4 4\n255\n", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@st.composite
def broken_image_bytes(draw):
    kind = draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=300))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "TIFF"]))
    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    if kind == "truncated":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@SETTINGS
@given(content=broken_image_bytes(), which=st.sampled_from(["image", "panoptic", "label"]))
def test_random_bytes_as_images(tmp_path_factory, content, which):
    path = str(tmp_path_factory.getbasetemp() / "bytes.png")
    open(path, "wb").write(content)
    decode = {"image": decode_image, "panoptic": decode_panoptic_png,
              "label": decode_label_png}[which]
    try:
        array, notes = decode(path, image_id=5)
    except DataError as e:
        assert_clear(e)
        assert e.path == path and e.ids == {"image_id": 5}
        assert e.kind in ("corrupt_image", "corrupt_png")
        return
    assert array.shape[:2] and all(n.severity == "note" for n in notes)  # it happened to decode


@SETTINGS
@given(image=broken_image_bytes(), png=broken_image_bytes())
def test_broken_files_in_a_data_set(base, image, png):
    write(base, "panoptic_train.json", valid_panoptic())
    a_img, a_png = os.path.join(base, "train", "a.png"), os.path.join(base, "panoptic_train", "a.png")
    open(a_img, "wb").write(image)
    open(a_png, "wb").write(png)
    try:
        exercise(CocoPanopticDataset, base, f"coco-panoptic:{base}")
        report = validate_dataset(f"coco-panoptic:{base}", "train")
        paths = {p.path for p in report.errors}
        assert paths <= {a_img, a_png}  # only sample a is broken ...
        assert report.errors  # ... and it is: a broken file rarely decodes to the right size
    finally:
        open(a_img, "wb").write(_png_bytes(IMAGE))
        rgb = np.stack([IDS % 256, IDS // 256 % 256, IDS // 65536], -1).astype(np.uint8)
        open(a_png, "wb").write(_png_bytes(rgb))


@SETTINGS
@given(label=broken_image_bytes(), cats=json_values | mutated(
    lambda: {"categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}))
def test_semantic_garbage(tmp_path_factory, label, cats):
    root = str(tmp_path_factory.getbasetemp() / "semantic")
    for d in ("images/training", "annotations/training"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    open(os.path.join(root, "images", "training", "x.png"), "wb").write(_png_bytes(IMAGE))
    open(os.path.join(root, "annotations", "training", "x.png"), "wb").write(label)
    open(os.path.join(root, "categories.json"), "w").write(json.dumps(cats))
    exercise(SemanticDataset, root, f"semantic:{root}")


# ---------------------------------------------------------------- segmentations

segmentations = (json_values
                 | st.lists(st.lists(st.floats(-1e6, 1e6) | st.integers(-50, 50), max_size=12),
                            max_size=3)
                 | st.fixed_dictionaries({"size": st.sampled_from([[H, W], [W, H], [H, W, 1], "x"]),
                                          "counts": st.text(max_size=20)
                                          | st.lists(st.integers(-5, H * W), max_size=6)
                                          | json_values}))


@SETTINGS
@given(seg=segmentations)
def test_decode_segmentation_never_crashes(seg):
    try:
        mask = decode_segmentation(copy.deepcopy(seg), H, W, "/ann.json", annotation_id=4)
    except DataError as e:
        assert_clear(e)
        assert e.path == "/ann.json" and e.ids.get("annotation_id") == 4
        return
    assert mask.shape == (H, W) and mask.dtype == bool


@SETTINGS
@given(bits=st.lists(st.booleans(), min_size=H * W, max_size=H * W))
def test_compressed_rle_matches_pycocotools(bits):
    mask = np.array(bits, dtype=np.uint8).reshape(H, W)
    rle = mask_utils.encode(np.asfortranarray(mask))
    seg = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    assert np.array_equal(decode_segmentation(seg, H, W, "/a.json"), mask.astype(bool))
    # and the uncompressed form of the same mask
    flat = mask.T.flatten()
    runs, value, n = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_segmentation({"size": [H, W], "counts": runs}, H, W, "/a.json"),
                          mask.astype(bool))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
@SETTINGS
@given(poly=st.lists(st.tuples(st.floats(-3 * W, 4 * W), st.floats(-3 * H, 4 * H)),
                     min_size=3, max_size=8))
def test_polygons_match_pycocotools(poly):
    flat = [v for xy in poly for v in xy]
    want = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([flat], H, W))).astype(bool)
    try:
        got = decode_segmentation([flat], H, W, "/a.json")
    except DataError:
        assume(False)
        return
    assert np.array_equal(got, want)
