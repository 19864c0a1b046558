"""Detection through the engine: `train` with a DetrConfig preset overfits a few synthetic
images (box AP from pycocotools), the checkpoint loads back as a detector, and `proscale
eval` / `proscale predict` / `Predictor` give box AP, detections and box overlays."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proscale.checkpoints.loader import load_model  # noqa: E402
from proscale.cli import main as cli  # noqa: E402
from proscale.config import DetrConfig  # noqa: E402
from proscale.engine.train import TrainConfig, split_overrides, train  # noqa: E402
from proscale.models.detr import DeformableDETR  # noqa: E402
from proscale.predictor import Predictor  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ddetr_nano (PRO-SCALE 2,2,2,2) trained 80 iterations on 4 synthetic 64x64 images, evaluated on them."""
    from proscale.data import generate_synthetic

    tmp = tmp_path_factory.mktemp("det")
    root = generate_synthetic(str(tmp / "data"), num_train=4, num_val=1, image_size=64, seed=0, difficulty="easy")
    cfg = TrainConfig(preset="proscale_ddetr_nano_2222", output_dir=str(tmp / "run"), progress=False)
    cfg.data.train = (f"synthetic:{root}",)
    cfg.data.val, cfg.data.val_split = f"synthetic:{root}", "train"
    split_overrides(cfg, ["batch_size=4", "iterations=80", "log_period=10", "checkpoint_period=0", "eval_period=0",
                          "data.augmentation=none", "data.min_size_test=0", "data.num_workers=0",
                          "solver.lr=1e-3", "solver.schedule=constant", "solver.backbone_multiplier=1.0",
                          "solver.clip_grad=0.1", "decoder.num_queries=20"])
    return root, tmp / "run", train(cfg)


def test_training_overfits_and_reports_box_ap(trained):
    root, run, result = trained
    det = result["eval"]["detection"]
    print(f"\ndetection overfit: AP {det['AP']:.1f}, AP50 {det['AP50']:.1f} after 80 iterations")
    assert result["status"] == "completed" and result["iteration"] == 80
    assert set(det) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class", "num_images"}
    assert det["num_images"] == 4
    assert det["AP50"] >= 50.0
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    losses = [r for r in records if "loss" in r]
    for key in ("loss_focal", "loss_bbox", "loss_giou", "loss_focal_0", "loss_giou_1"):
        assert key in losses[0], key
    assert losses[-1]["loss"] < 0.6 * losses[0]["loss"]
    assert records[-1]["eval"]["detection"]["AP"] == pytest.approx(det["AP"])


def test_checkpoint_loads_back_as_a_detector(trained):
    _, run, _ = trained
    model, info = load_model(run / "model_final.pt")
    assert isinstance(model, DeformableDETR) and isinstance(info.config, DetrConfig)
    assert info.config.encoder.plan == (2, 2, 2, 2) and info.config.decoder.num_queries == 20


def test_eval_and_predict_commands(trained, tmp_path, capsys):
    root, run, result = trained
    assert cli(["eval", "--checkpoint", str(run / "model_final.pt"), "--data", f"synthetic:{root}",
                "--split", "train", "--num-workers", "0", "--min-size-test", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "detection: AP" in printed
    image = sorted(glob.glob(os.path.join(root, "train", "*.jpg")))[0]
    out = tmp_path / "viz"
    assert cli(["predict", "--checkpoint", str(run / "model_final.pt"), image, "--out", str(out),
                "--device", "cpu", "--score-threshold", "0.2"]) == 0
    stem = os.path.splitext(os.path.basename(image))[0]
    dets = json.loads((out / f"{stem}_detections.json").read_text())["detections"]
    assert dets and all(len(d["bbox"]) == 4 and d["category_name"] for d in dets)
    assert (out / f"{stem}_detection_overlay.png").stat().st_size > 0
    p = Predictor(run / "model_final.pt", device="cpu")
    assert p.tasks == ("detection",)
    res = p.predict(image)["detections"]
    assert res["boxes"].shape[1] == 4 and torch.all(res["scores"][:-1] >= res["scores"][1:])
    with pytest.raises(ValueError, match="detector"):
        Predictor(run / "model_final.pt", device="cpu", tasks="panoptic")
