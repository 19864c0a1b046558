"""Predictor, `proscale predict` / `proscale eval`, and the visualisations."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import proscale  # noqa: E402
from proscale.checkpoints.io import save_model  # noqa: E402
from proscale.data import SYNTHETIC_CATEGORIES  # noqa: E402
from proscale.predictor import Predictor  # noqa: E402


def run_cli(argv: list[str]) -> int:
    from proscale.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with the synthetic categories; thresholds at 0 so that even random weights
    produce segments and every output file has content."""
    torch.manual_seed(0)
    model = proscale.build_model("m2f_tiny", num_classes=8)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    meta = {"name": "synthetic", "categories": [{"id": c.id, "name": c.name, "isthing": c.isthing,
                                                   "color": list(c.color)} for c in SYNTHETIC_CATEGORIES]}
    save_model(model, path, extra={
        "metadata": meta,
        "train_config": {"data": {"min_size_test": 64, "max_size_test": 128},
                         "test": {"object_mask_threshold": 0.0, "overlap_threshold": 0.0}}})
    return path


@pytest.fixture
def image_rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)


def test_predictor_inputs_give_original_size_results(checkpoint, image_rgb, tmp_path):
    p = Predictor(checkpoint, device="cpu", tasks=("panoptic", "instance", "semantic"))
    assert p.metadata.class_names[:2] == ["circle", "square"]
    assert (p.min_size_test, p.max_size_test) == (64, 128)
    path = tmp_path / "im.png"
    Image.fromarray(image_rgb).save(path)
    outs = [p.predict(x) for x in (str(path), Image.fromarray(image_rgb), image_rgb,
                                   torch.from_numpy(image_rgb).permute(2, 0, 1))]
    pan = outs[0]["panoptic"]
    assert pan["panoptic_seg"].shape == (70, 90) and pan["panoptic_seg"].dtype == torch.int32
    assert pan["segments_info"], "thresholds are 0: some segment must survive"
    assert sum(s["area"] for s in pan["segments_info"]) == int((pan["panoptic_seg"] > 0).sum())
    ins = outs[0]["instances"]
    assert ins["masks"].shape[1:] == (70, 90) and ins["masks"].dtype == torch.bool
    assert set(ins["labels"].tolist()) <= set(p.metadata.thing_classes)
    assert outs[0]["sem_seg"].shape == (8, 70, 90)
    for other in outs[1:]:  # the same pixels whatever the input type
        assert torch.equal(other["panoptic"]["panoptic_seg"], pan["panoptic_seg"])
        assert torch.allclose(other["sem_seg"], outs[0]["sem_seg"])


def test_predictor_from_model_and_bad_inputs(image_rgb):
    model = proscale.build_model("m2f_tiny", num_classes=3)
    p = Predictor(model, device="cpu", tasks="semantic", min_size_test=0)
    out = p.predict(image_rgb)
    assert set(out) == {"sem_seg"} and out["sem_seg"].shape == (3, 70, 90)
    assert p.metadata.class_names == ["class_0", "class_1", "class_2"]
    with pytest.raises(ValueError):
        Predictor(model, tasks=("depth",))
    with pytest.raises(ValueError):
        p.predict(np.zeros((4, 5, 6), dtype=np.uint8))
    from proscale.data import DataError

    with pytest.raises(DataError):
        p.predict("/nonexistent/image.jpg")


def test_predictor_from_released_weights_uses_defaults(checkpoint, image_rgb, tmp_path):
    """A detectron2 .pkl has no categories or test sizes: generic names and 800 / 1333."""
    import pickle

    from proscale.checkpoints import load_model, to_detectron2

    model, _ = load_model(checkpoint)
    pkl = tmp_path / "official.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": to_detectron2(model.state_dict(), numpy=True)}, f)
    released = Predictor(pkl, device="cpu", tasks="semantic", min_size_test=64, max_size_test=128)
    assert released.metadata.class_names == [f"class_{i}" for i in range(8)]
    assert Predictor(pkl, device="cpu").min_size_test == 800
    assert released.predict(image_rgb)["sem_seg"].shape == (8, 70, 90)
    official = to_detectron2(released.model.state_dict())  # the same tensors (attention heads are a guess)
    assert all(torch.equal(v, official[k]) for k, v in to_detectron2(model.state_dict()).items())


def test_eval_cli_names_an_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert run_cli(["eval", "--checkpoint", str(bad), "--data", f"synthetic:{tmp_path}", "--device", "cpu"]) == 1
    assert f"error: {bad}: not a readable torch checkpoint" in capsys.readouterr().err


def test_predict_cli_folder_with_a_corrupt_file(checkpoint, image_rgb, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(image_rgb).save(folder / "a.jpg")
    Image.fromarray(image_rgb[:50, :60]).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("not an image, not an input")
    out = tmp_path / "out"
    code = run_cli(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu",
                    "--task", "panoptic", "--task", "instance", "--task", "semantic"])
    err = capsys.readouterr().err
    assert code != 0
    assert "broken.jpg" in err and "a.jpg" not in err and "notes.txt" not in err
    for stem, (h, w) in (("a", (70, 90)), ("b", (50, 60))):
        seg = np.asarray(Image.open(out / f"{stem}_panoptic.png").convert("RGB")).astype(np.int64)
        ids = seg[..., 0] + 256 * seg[..., 1] + 65536 * seg[..., 2]
        assert ids.shape == (h, w)
        info = json.loads((out / f"{stem}_panoptic.json").read_text())
        assert (info["height"], info["width"]) == (h, w)
        assert {s["id"] for s in info["segments_info"]} == set(np.unique(ids).tolist()) - {0}
        assert all(s["category_id"] in {c.id for c in SYNTHETIC_CATEGORIES} for s in info["segments_info"])
        inst = json.loads((out / f"{stem}_instances.json").read_text())["instances"]
        assert inst and inst[0]["segmentation"]["size"] == [h, w] and len(inst[0]["bbox"]) == 4
        assert np.asarray(Image.open(out / f"{stem}_semantic.png")).shape == (h, w)
        for task in ("panoptic", "instance", "semantic"):
            overlay = np.asarray(Image.open(out / f"{stem}_{task}_overlay.png"))
            assert overlay.shape == (h, w, 3)
    assert not list(out.glob("broken*"))


def test_predict_cli_all_good_exits_zero(checkpoint, image_rgb, tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(image_rgb).save(path)
    assert run_cli(["predict", "--checkpoint", str(checkpoint), str(path), "--out", str(tmp_path / "o"),
                    "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "x_panoptic.json", "x_panoptic.png", "x_panoptic_overlay.png"]


def test_eval_cli_on_synthetic_data(checkpoint, tmp_path, capsys):
    from proscale.data import generate_synthetic

    root = generate_synthetic(str(tmp_path / "data"), num_train=1, num_val=2, image_size=64, seed=0)
    code = run_cli(["eval", "--checkpoint", str(checkpoint), "--data", f"synthetic:{root}", "--device", "cpu",
                    "--num-workers", "0", "--out", str(tmp_path / "eval")])
    assert code == 0
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(results) == {"panoptic", "instance", "semantic"}
    assert results["panoptic"]["num_images"] == 2 and "mIoU" in results["semantic"]
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 2  # COCO panoptic format, PNGs beside it
    printed = capsys.readouterr().out
    assert "PQ" in printed and "2 images in " in printed and " images/s (batch size 1 x 1 process(es)" in printed
    assert run_cli(["eval", "--checkpoint", str(checkpoint), "--data", f"synthetic:{root}", "--device", "cpu",
                    "--num-workers", "0", "--batch-size", "2", "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "metrics.json").read_text()) == results


def test_visualizations(tmp_path, image_rgb):
    from proscale.data.metadata import DatasetMetadata
    from proscale.visualize import draw_ground_truth, draw_instances, draw_panoptic, draw_semantic, plot_losses

    md = DatasetMetadata(categories=list(SYNTHETIC_CATEGORIES))
    seg = np.zeros((70, 90), dtype=np.int32)
    seg[10:30, 10:40] = 1
    seg[40:60, :] = 2
    segments = [{"id": 1, "category_id": 0, "isthing": True, "score": 0.9},
                {"id": 2, "category_id": 5, "isthing": False, "score": 0.8}]
    pan = draw_panoptic(image_rgb, torch.from_numpy(seg), segments, md)
    assert pan.shape == (70, 90, 3) and pan.dtype == np.uint8
    assert np.array_equal(pan[0:5, 60:90], image_rgb[0:5, 60:90])  # void stays as it was
    assert not np.array_equal(pan[45:55], image_rgb[45:55])

    masks = torch.zeros(2, 70, 90, dtype=torch.bool)
    masks[0, 5:20, 5:20] = True
    masks[1, 30:50, 30:50] = True
    ins = draw_instances(image_rgb, masks, torch.tensor([1, 2]), torch.tensor([0.9, 0.2]), md, score_threshold=0.5)
    assert np.array_equal(ins[35:45, 35:45], image_rgb[35:45, 35:45])  # below the threshold: not drawn
    assert not np.array_equal(ins[8:16, 8:16], image_rgb[8:16, 8:16])
    sem = draw_semantic(image_rgb, torch.randn(8, 70, 90), md)
    assert sem.shape == (70, 90, 3)
    gt = draw_ground_truth({"image": torch.from_numpy(image_rgb).permute(2, 0, 1), "masks": masks,
                            "labels": torch.tensor([0, 6])}, md)
    assert gt.shape == (70, 90, 3)

    log = tmp_path / "metrics.jsonl"
    lines = [{"iteration": i, "loss": 10.0 / i, "loss_ce": 1.0 / i, "loss_mask": 0.5, "loss_dice": 0.4, "lr": 1e-4}
             for i in range(1, 11)]
    lines.append({"iteration": 10, "eval": {"panoptic": {"PQ": 42.0}}})
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = plot_losses(log, tmp_path / "loss.png")
    assert Image.open(png).size[0] > 100


# ------------------------------------------------------------------ batched inference
# Sizes after the checkpoint's test resize (short side 64, long side <= 128) and their /32 padding:
# (70, 90) -> 64x82 -> 64x96; (64, 80) -> 64x80 -> 64x96; (66, 92) -> 64x89 -> 64x96;
# (80, 60) -> 85x64 -> 96x64; (50, 100) -> 64x128 -> 64x128; (90, 70) -> 82x64 -> 96x64.
BATCH_SIZES = [(70, 90), (64, 80), (80, 60), (50, 100), (66, 92), (90, 70)]


def _random_images(sizes, seed=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def _assert_same_result(a: dict, b: dict, where: str) -> None:
    """Equal up to float rounding: semantic scores to 1e-5, instance scores to 1e-5 and their masks,
    and the panoptic map pixel for pixel (segment ids and their classes)."""
    torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=0, atol=1e-5, msg=where)
    assert torch.equal(a["instances"]["labels"], b["instances"]["labels"]), where
    torch.testing.assert_close(a["instances"]["scores"], b["instances"]["scores"], rtol=0, atol=1e-5, msg=where)
    assert torch.equal(a["instances"]["masks"], b["instances"]["masks"]), where
    assert torch.equal(a["panoptic"]["panoptic_seg"], b["panoptic"]["panoptic_seg"]), where
    assert [(s["id"], s["category_id"], s["area"]) for s in a["panoptic"]["segments_info"]] == \
        [(s["id"], s["category_id"], s["area"]) for s in b["panoptic"]["segments_info"]], where


def test_batched_predictions_equal_one_at_a_time(checkpoint):
    p = Predictor(checkpoint, device="cpu", tasks=("panoptic", "instance", "semantic"))
    images = _random_images(BATCH_SIZES)
    single = [p.predict(im) for im in images]
    for r, (h, w) in zip(single, BATCH_SIZES):
        assert r["panoptic"]["panoptic_seg"].shape == (h, w) and r["sem_seg"].shape[1:] == (h, w)
    for batch_size in (2, 4):
        batched = p.predict(images, batch_size=batch_size)
        assert len(batched) == len(images)
        for i, (a, b) in enumerate(zip(single, batched)):
            assert b["panoptic"]["panoptic_seg"].shape == BATCH_SIZES[i]
            _assert_same_result(a, b, f"image {i} {BATCH_SIZES[i]}, batch size {batch_size}")
    # Which images shared a forward: those of one padded size, at most batch_size at a time, in
    # input order; a forced flush (max_pending) runs a partial group and changes nothing.
    order = [i for i, _, _ in p.predict_iter(images, batch_size=2)]
    assert order == [0, 1, 2, 5, 3, 4]  # 64x96: 0, 1 | 96x64: 2, 5 | leftovers: 64x128: 3, 64x96: 4
    flushed = sorted(p.predict_iter(images, batch_size=3, max_pending=2), key=lambda t: t[0])
    for (i, image, b), a in zip(flushed, single):
        assert torch.equal(image, torch.from_numpy(images[i]).permute(2, 0, 1))
        _assert_same_result(a, b, f"image {i}, flushed early")


def test_padding_further_would_change_results(checkpoint):
    """Why batches hold one padded size only: the same image padded to a larger batch's size
    gives other class logits (the model attends over padding), so grouping is not optional."""
    p = Predictor(checkpoint, device="cpu")
    a, b = (torch.from_numpy(im).permute(2, 0, 1) for im in _random_images([(64, 80), (64, 128)]))
    with torch.no_grad():
        alone, together = p.model([a]), p.model([a, b])
    assert together["padded_size"] != alone["padded_size"]
    assert (alone["pred_logits"][0] - together["pred_logits"][0]).abs().max() > 1e-3


def test_group_by_padded_shape():
    from proscale.models.batching import group_by_padded_shape, padded_shape

    assert padded_shape((70, 90), 32) == (96, 96) and padded_shape((64, 96), 32) == (64, 96)
    sizes = [(70, 90), (80, 96), (120, 90), (65, 65), (96, 96), (10, 10)]
    assert group_by_padded_shape(sizes, 32) == [[0, 1, 3, 4], [2], [5]]
    assert group_by_padded_shape(sizes, 32, batch_size=2) == [[0, 1], [2], [3, 4], [5]]
    assert group_by_padded_shape([], 32) == []


def test_predict_cli_batch_size_same_files_and_throughput(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(_random_images(BATCH_SIZES)):
        Image.fromarray(im).save(folder / f"im{i}.png")
    outs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}"
        assert run_cli(["predict", "--checkpoint", str(checkpoint), str(folder), "--out", str(out), "--device", "cpu",
                        "--task", "panoptic", "--task", "semantic", "--batch-size", str(batch_size)]) == 0
        printed = capsys.readouterr().out
        assert f"6 image(s) written to {out} in " in printed and " images/s (batch size " in printed
        outs[batch_size] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(outs[1]) == 6 * 5 and outs[1].keys() == outs[3].keys()
    differ = [name for name in outs[1] if outs[1][name] != outs[3][name]]
    assert not differ, differ
