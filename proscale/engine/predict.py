"""`proscale predict`: run a checkpoint on images and write results and overlays.

    proscale predict --checkpoint runs/r50/model_final.pt images/*.jpg --out viz/ --task panoptic
    proscale predict --checkpoint ... photos/ --out viz/ --task panoptic --task instance --task semantic
    proscale predict --checkpoint ... photos/ --out viz/ --batch-size 8    # 8 images per forward

For each image STEM, in --out:
    panoptic   STEM_panoptic.png (segment id = R + 256 G + 256^2 B, 0 = void),
               STEM_panoptic.json (segments: id, category_id (data set id), category_name, isthing,
               score, area), STEM_panoptic_overlay.png
    instance   STEM_instances.json (category_id, category_name, score, bbox [x, y, w, h],
               segmentation as COCO RLE), STEM_instance_overlay.png
    semantic   STEM_semantic.png (uint8 contiguous class index per pixel), STEM_semantic_overlay.png
    detection  STEM_detections.json (category_id, category_name, score, bbox [x, y, w, h]),
               STEM_detection_overlay.png (a detector's only task, and its default)
A folder contributes its image files (by extension). An image that cannot be read is reported
and skipped; the others are still written, and the exit status is then 1. --batch-size N puts up
to N images that pad to the same size in one forward (results equal to one at a time; see
proscale.predictor). The throughput (images/s, from the first image read to the last file
written) is printed at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from proscale import distributed as du
from proscale.precision import PrecisionError, add_dtype_argument

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files, [(input, problem)]): folders give their image files (sorted), files are taken as
    they are, missing paths are problems."""
    files, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append((item, "folder holds no image files"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append((item, "no such file or folder"))
    return files, problems


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_results(predictor, image, result: dict, out: Path, stem: str, file_name: str,
                  score_threshold: float = 0.5) -> list[Path]:
    """Writes the files described in the module docstring for one image; returns their paths."""
    import pycocotools.mask as mask_util

    from proscale.evaluation import encode_masks
    from proscale.evaluation.common import id_to_rgb
    from proscale.fileio import atomic_write
    from proscale.visualize import draw_boxes, draw_instances, draw_panoptic, draw_semantic

    md = predictor.metadata
    h, w = image.shape[:2]
    written = []

    def put(name: str, data: bytes) -> None:
        atomic_write(out / name, data)
        written.append(out / name)

    def put_json(name: str, obj: dict) -> None:
        put(name, json.dumps(obj, indent=1).encode())

    if "panoptic" in result:
        pan = result["panoptic"]
        seg = pan["panoptic_seg"].numpy()
        put(f"{stem}_panoptic.png", _png_bytes(id_to_rgb(seg)))
        segments = [{"id": s["id"], "category_id": md.dataset_id(s["category_id"]),
                     "category_name": md.class_names[s["category_id"]], "isthing": bool(s["isthing"]),
                     "score": round(float(s["score"]), 5), "area": int(s["area"])} for s in pan["segments_info"]]
        put_json(f"{stem}_panoptic.json", {"file_name": file_name, "height": h, "width": w, "segments_info": segments})
        put(f"{stem}_panoptic_overlay.png", _png_bytes(draw_panoptic(image, seg, pan["segments_info"], md)))
    if "instances" in result:
        ins = result["instances"]
        rles = encode_masks(ins["masks"])
        items = []
        for rle, score, label in zip(rles, ins["scores"].tolist(), ins["labels"].tolist()):
            items.append({"category_id": md.dataset_id(label), "category_name": md.class_names[label],
                          "score": round(float(score), 5),
                          "bbox": [round(float(v), 2) for v in mask_util.toBbox({**rle, "counts": rle["counts"].encode()})],
                          "segmentation": rle})
        put_json(f"{stem}_instances.json", {"file_name": file_name, "height": h, "width": w, "instances": items})
        put(f"{stem}_instance_overlay.png",
            _png_bytes(draw_instances(image, ins["masks"], ins["labels"], ins["scores"], md, score_threshold)))
    if "detections" in result:
        det = result["detections"]
        items = [{"category_id": md.dataset_id(label), "category_name": md.class_names[label],
                  "score": round(float(score), 5),
                  "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)]}
                 for (x0, y0, x1, y1), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                           det["labels"].tolist())]
        put_json(f"{stem}_detections.json", {"file_name": file_name, "height": h, "width": w, "detections": items})
        put(f"{stem}_detection_overlay.png",
            _png_bytes(draw_boxes(image, det["boxes"], det["labels"], det["scores"], md, score_threshold)))
    if "sem_seg" in result:
        labels = result["sem_seg"].argmax(0).numpy().astype(np.uint8)
        put(f"{stem}_semantic.png", _png_bytes(labels))
        put(f"{stem}_semantic_overlay.png", _png_bytes(draw_semantic(image, labels, md)))
    return written


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="segment images with a checkpoint; write results and overlays",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", action="append", choices=("panoptic", "instance", "semantic", "detection"),
                   help="repeat for several (default: panoptic; detection for a detector)")
    p.add_argument("--device", default="auto")
    du.add_threads_argument(p)
    add_dtype_argument(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (those of one padded size)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="instances / boxes drawn in the overlay")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from proscale.data.errors import DataError
    from proscale.predictor import Predictor, load_image

    du.set_threads(args.threads)
    files, failures = collect_images(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.checkpoint, device=args.device, tasks=tuple(args.task) if args.task else None,
                              dtype=args.dtype)
    except PrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    read: list[tuple[Path, str]] = []  # (file, output stem) of each image handed to the predictor
    stems: dict[str, int] = {}

    def images():
        for path in files:
            try:
                image = load_image(path)
            except (DataError, OSError, ValueError) as e:
                problem = e.problem if isinstance(e, DataError) else str(e)
                failures.append((str(path), problem))
                print(f"skipped {path}: {problem}", file=sys.stderr)
                continue
            stem = path.stem
            if stem in stems:  # same name in two folders: keep both
                stems[stem] += 1
                stem = f"{stem}_{stems[stem]}"
            else:
                stems[stem] = 0
            read.append((path, stem))
            yield image

    start = time.perf_counter()
    done = 0
    for index, image, result in predictor.predict_iter(images(), args.batch_size):
        path, stem = read[index]
        write_results(predictor, image.permute(1, 2, 0).numpy(), result, out, stem, path.name, args.score_threshold)
        done += 1
    elapsed = time.perf_counter() - start
    rate = f": {done / elapsed:.2f} images/s" if done and elapsed > 0 else ""
    print(f"{done} image(s) written to {out} in {elapsed:.1f} s{rate} (batch size {args.batch_size}, "
          f"{predictor.device}, {args.dtype}; reading, model, post-processing and writing)")
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for item, problem in failures:
            print(f"  {item}: {problem}", file=sys.stderr)
        return 1
    return 0
