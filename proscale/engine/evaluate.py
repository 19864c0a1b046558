"""Evaluation: `evaluate(model, dataloader, metadata, tasks) -> dict` and `proscale eval`.

    proscale eval --checkpoint runs/r50/model_final.pt --data coco-panoptic:/data/coco [--task panoptic ...]
    torchrun --nproc_per_node 8 -m proscale eval ...       # each rank scores a shard; results gathered

Tasks and their metrics (percent):
    panoptic  PQ, SQ, RQ (all / things / stuff) against the panoptic PNGs      (PanopticEvaluator)
    instance  COCO mask AP (instances json, or the thing segments of the panoptic ground truth)
    semantic  mIoU, fwIoU, mACC, pACC against label PNGs or the panoptic ground truth
    detection COCO box AP (AP, AP50, AP75, APs, APm, APl) of a detector (a DetrConfig preset);
              ground truth: the instances json's boxes, or the thing segments' boxes
A detector is evaluated on "detection" only, a segmentation model on the other tasks.
Predictions are made at the test size and scored at the original image size. A batch runs as
groups of images that pad to the same size (proscale.models.batching), so --batch-size never
changes the metrics. The throughput (images/s over the whole evaluation) is printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from proscale import distributed as du
from proscale.models.batching import group_by_padded_shape
from proscale.models.detr import DeformableDETR
from proscale.models.postprocess import InferenceConfig, postprocess
from proscale.precision import PrecisionError, add_dtype_argument, outputs_to_float32, resolve_dtype

logger = logging.getLogger("proscale.eval")

TASKS = ("panoptic", "instance", "semantic")
DETECTION = "detection"


def tasks_from_config(test: InferenceConfig) -> tuple[str, ...]:
    """The tasks an InferenceConfig switches on."""
    flags = (test.panoptic_on, test.instance_on, test.semantic_on)
    return tuple(t for t, on in zip(TASKS, flags) if on)


def available_tasks(metadata) -> tuple[str, ...]:
    """The tasks this data set has ground truth for."""
    has = {"panoptic": bool(metadata.panoptic_json and metadata.panoptic_root),
           "instance": bool((metadata.instances_json or metadata.panoptic_json) and metadata.thing_classes),
           "semantic": _SemanticGroundTruth.available(metadata)}
    return tuple(t for t in TASKS if has[t])


def evaluation_tasks(test: InferenceConfig, metadata) -> tuple[tuple[str, ...], str]:
    """(tasks to evaluate during training, a note): those switched on that the data supports; when
    none of them is (e.g. semantic labels only, while semantic_on is off by default), every task
    the data supports, so that a run is never evaluated on nothing."""
    wanted, have = tasks_from_config(test), available_tasks(metadata)
    tasks = tuple(t for t in wanted if t in have)
    if tasks:
        missing = [t for t in wanted if t not in have]
        return tasks, (f"no {', '.join(missing)} ground truth in the validation data" if missing else "")
    return have, (f"the validation data has {', '.join(have) or 'no'} ground truth only (none of the switched-on "
                  f"tasks {', '.join(wanted) or '-'}): evaluating {', '.join(have) or 'nothing'}")


class _SemanticGroundTruth:
    """Semantic labels at the original size: a label PNG (semantic data sets, or COCO's
    panoptic_semseg_{split}), else derived from the panoptic PNG."""

    def __init__(self, metadata):
        self.metadata = metadata
        self._panoptic = None
        if metadata.sem_seg_root is None and metadata.panoptic_json is not None:
            from proscale.evaluation.common import load_json

            gt = load_json(metadata.panoptic_json)
            self._panoptic = {int(a["image_id"]): a for a in gt["annotations"]}

    @staticmethod
    def available(metadata) -> bool:
        return metadata.sem_seg_root is not None or metadata.panoptic_json is not None

    def __call__(self, image_id: int, file_name: str) -> np.ndarray:
        md = self.metadata
        if md.sem_seg_root is not None:
            from proscale.data import read_sem_seg

            return read_sem_seg(md.sem_seg_path(file_name), md, image_id=image_id)
        from proscale.evaluation import semantic_from_panoptic
        from proscale.evaluation.common import read_panoptic_png

        ann = self._panoptic[int(image_id)]
        pan = read_panoptic_png(Path(md.panoptic_root) / ann["file_name"])
        return semantic_from_panoptic(pan, ann["segments_info"], md.dataset_id_to_contiguous, md.ignore_label)


def build_evaluators(metadata, tasks, output_dir: str | Path | None = None) -> dict:
    """{task: evaluator} for the tasks this data set has ground truth for (others are skipped
    with a warning). With `output_dir`, panoptic predictions are written there in COCO format."""
    from proscale.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator

    evaluators: dict = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
        if task == "panoptic" and metadata.panoptic_json and metadata.panoptic_root:
            evaluators[task] = PanopticEvaluator(metadata, output_dir=output_dir)
        elif task == "instance" and (metadata.instances_json or metadata.panoptic_json) and metadata.thing_classes:
            evaluators[task] = InstanceEvaluator(metadata)
        elif task == "semantic" and _SemanticGroundTruth.available(metadata):
            evaluators[task] = SemanticEvaluator(metadata.num_classes, metadata.ignore_label, metadata.class_names)
        else:
            logger.warning("%s: no %s ground truth, %s evaluation skipped", metadata.name or "data", task, task)
    return evaluators


@torch.no_grad()
def evaluate(model: nn.Module, dataloader, metadata, tasks=TASKS, inference: InferenceConfig | None = None,
             device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None,
             output_dir: str | Path | None = None) -> dict:
    """Runs the model over `dataloader` (collate batches; a shard per rank under torch.distributed)
    and returns {task: metrics} for the requested tasks the data has ground truth for; the same
    dict on every rank. The model is left in eval mode. `output_dir`: also write the panoptic
    predictions (predictions.json + PNGs, rank 0)."""
    inference = inference or InferenceConfig()
    if isinstance(model, DeformableDETR):
        return {DETECTION: evaluate_detection(model, dataloader, metadata, inference.test_topk_per_image, device,
                                              amp_dtype)}
    if DETECTION in tasks:
        logger.warning("detection (box AP) needs a detector (a ddetr_* preset); this is a segmentation model")
    tasks = tuple(t for t in tasks if t != DETECTION)
    evaluators = build_evaluators(metadata, tasks, output_dir)
    cfg = dataclasses.replace(inference, panoptic_on="panoptic" in evaluators, instance_on="instance" in evaluators,
                              semantic_on="semantic" in evaluators)
    semantic_gt = _SemanticGroundTruth(metadata) if "semantic" in evaluators else None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    thing_ids = metadata.thing_classes
    divisibility = getattr(getattr(model, "module", model), "size_divisibility", 32)
    for batch in dataloader:
        images = [im.to(device) for im in batch["images"]]
        meta = [{"height": h, "width": w} for h, w in zip(batch["height"], batch["width"])]
        results: list = [None] * len(images)
        for group in group_by_padded_shape([im.shape[-2:] for im in images], divisibility):
            with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float16,
                                enabled=amp_dtype is not None):
                outputs = model([images[i] for i in group])
            outputs = outputs_to_float32(outputs)  # post-processing in fp32 whatever the autocast dtype
            for i, res in zip(group, postprocess(outputs, [meta[i] for i in group], cfg, thing_ids)):
                results[i] = res
        for i, res in enumerate(results):
            image_id = batch["image_id"][i]
            if "panoptic" in evaluators:
                pan = res["panoptic"]
                evaluators["panoptic"].process(image_id, pan["panoptic_seg"].cpu(), pan["segments_info"])
            if "instance" in evaluators:
                ins = res["instances"]
                evaluators["instance"].process(image_id, ins["masks"].cpu(), ins["scores"].cpu(), ins["labels"].cpu())
            if semantic_gt is not None:
                gt = semantic_gt(image_id, batch["file_name"][i])
                evaluators["semantic"].process(res["sem_seg"].argmax(0).cpu(), gt)
    return {task: ev.evaluate() for task, ev in evaluators.items()}


@torch.no_grad()
def evaluate_detection(model: nn.Module, dataloader, metadata, topk: int = 100,
                       device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None) -> dict:
    """COCO box AP (percent) of a detector over `dataloader`: {"AP", "AP50", "AP75", "APs",
    "APm", "APl", "per_class", "num_images"}, the same on every rank. Boxes are the top
    `topk` (query, class) scores per image, scaled to the original image size."""
    from proscale.evaluation import InstanceEvaluator
    from proscale.models.detr.postprocess import detections

    if not ((metadata.instances_json or metadata.panoptic_json) and metadata.thing_classes):
        raise ValueError(f"{metadata.name or 'data'}: no instances or panoptic ground truth for box AP")
    evaluator = InstanceEvaluator(metadata, iou_type="bbox")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    for batch in dataloader:
        images = [im.to(device) for im in batch["images"]]
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
            outputs = model(images)
        outputs = outputs_to_float32(outputs)
        sizes = list(zip(batch["height"], batch["width"]))
        for image_id, det in zip(batch["image_id"], detections(outputs, sizes, topk)):
            evaluator.process_boxes(image_id, det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu())
    return evaluator.evaluate()


def summary_line(results: dict) -> str:
    keys = {"panoptic": ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"), "instance": ("AP", "AP50", "AP75"),
            DETECTION: ("AP", "AP50", "AP75", "APs", "APm", "APl"),
            "semantic": ("mIoU", "pACC")}
    parts = []
    for task, res in results.items():
        vals = [f"{k} {res[k]:.2f}" for k in keys.get(task, ()) if isinstance(res.get(k), (int, float))
                and math.isfinite(res[k])]
        parts.append(f"{task}: " + ", ".join(vals))
    return "; ".join(parts)


# ------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a checkpoint (PQ, mask AP, mIoU; box AP of a detector)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a proscale checkpoint (e.g. OUT/model_final.pt)")
    p.add_argument("--data", required=True, metavar="SPEC", help="e.g. coco-panoptic:/data/coco")
    p.add_argument("--split", default="val")
    p.add_argument("--task", action="append", choices=TASKS + (DETECTION,),
                   help="repeat for several (default: all available; a detector always gives detection)")
    p.add_argument("--device", default="auto")
    du.add_threads_argument(p)
    add_dtype_argument(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward, per process")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--min-size-test", type=int, help="test short side (default: the checkpoint's, else 800)")
    p.add_argument("--max-size-test", type=int, help="test long-side cap (default: the checkpoint's, else 1333)")
    p.add_argument("--out", help="write metrics.json and the panoptic predictions (COCO format) here")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from proscale.checkpoints.errors import CheckpointError
    from proscale.data import TransformConfig, build_dataloader, build_dataset, build_transforms
    from proscale.predictor import load_for_inference

    du.set_threads(args.threads)

    info = du.init_distributed(args.device)
    try:
        try:
            amp_dtype = resolve_dtype(args.dtype, info.device)
        except PrecisionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            model, settings = load_for_inference(args.checkpoint, info.device)
        except CheckpointError as e:  # names the file and the problem; a traceback would add nothing
            print(f"error: {e}", file=sys.stderr)
            return 1
        min_size = args.min_size_test if args.min_size_test is not None else settings.min_size_test
        max_size = args.max_size_test if args.max_size_test is not None else settings.max_size_test
        transforms = build_transforms(False, TransformConfig(min_size_test=min_size, max_size_test=max_size))
        dataset = build_dataset(args.data, args.split, transforms)
        if dataset.metadata.num_classes != model.num_classes:
            print(f"error: {args.data} has {dataset.metadata.num_classes} classes, the model "
                  f"{model.num_classes}", file=sys.stderr)
            return 2
        loader = build_dataloader(dataset, args.batch_size, train=False, num_workers=args.num_workers,
                                  distributed=info.distributed)
        start = time.perf_counter()
        results = evaluate(model, loader, dataset.metadata, tuple(args.task or TASKS), settings.inference, info.device,
                           amp_dtype=None if amp_dtype == torch.float32 else amp_dtype, output_dir=args.out)
        elapsed = time.perf_counter() - start
        if info.is_main:
            print(summary_line(results))
            print(f"{len(dataset)} images in {elapsed:.1f} s: {len(dataset) / max(elapsed, 1e-9):.2f} images/s "
                  f"(batch size {args.batch_size} x {info.world_size} process(es), {info.device}, {args.dtype}; reading, model, "
                  f"post-processing and scoring)")
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        du.cleanup(info)
    return 0
