"""`Predictor`: a checkpoint (or model) in, panoptic / instance / semantic results out.

    from proscale import Predictor
    p = Predictor("runs/r50/model_final.pt", tasks=("panoptic", "instance"))
    out = p.predict("image.jpg")     # path, PIL image, (H, W, 3) uint8 array or (3, H, W) tensor (RGB)
    out["panoptic"]["panoptic_seg"]  # int32 (H, W) segment ids at the original size, 0 = void
    p.metadata.class_names[s["category_id"]] for s in out["panoptic"]["segments_info"]
    outs = p.predict(["a.jpg", "b.jpg", ...], batch_size=8)   # a list in, a list out (same order)

The image is resized as at test time (short side `min_size_test`, long side at most
`max_size_test`: the checkpoint's training settings, else 800 / 1333), run through the model, and
the results are mapped back to the original size (docs/INTERFACES.md, post-processing).

Batches hold only images that pad to the same /32 size as they would alone
(proscale.models.batching: more padding would change the results), so every result equals the
one-at-a-time result up to float rounding; images of other sizes wait for their own batch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from proscale.checkpoints.loader import CheckpointInfo, load_model
from proscale.data.metadata import Category, DatasetMetadata
from proscale.distributed import resolve_device
from proscale.models.batching import padded_shape
from proscale.models.detr import DeformableDETR
from proscale.models.detr.postprocess import detections
from proscale.models.postprocess import InferenceConfig, postprocess
from proscale.precision import inference_autocast, outputs_to_float32, resolve_dtype

TASK_KEYS = {"panoptic": "panoptic", "instance": "instances", "semantic": "sem_seg", "detection": "detections"}
SEGMENTATION_TASKS = ("panoptic", "instance", "semantic")


def metadata_from_dict(data: dict | None, num_classes: int) -> DatasetMetadata:
    """DatasetMetadata from a checkpoint's "metadata" entry, or generic names class_0.. (all things)."""
    if data and data.get("categories"):
        cats = [Category(int(c["id"]), str(c["name"]), bool(c.get("isthing", True)),
                         tuple(c["color"]) if c.get("color") is not None else None) for c in data["categories"]]
        if len(cats) == num_classes:
            return DatasetMetadata(categories=cats, name=str(data.get("name", "")))
    return DatasetMetadata(categories=[Category(i, f"class_{i}") for i in range(num_classes)])


@dataclass
class PredictorSettings:
    """How a model runs at test time: class names, test resize and post-processing."""

    metadata: DatasetMetadata
    min_size_test: int = 800  # short side (0: no resize)
    max_size_test: int = 1333  # long-side cap
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    @classmethod
    def from_checkpoint(cls, info: CheckpointInfo) -> PredictorSettings:
        """The categories and test settings a checkpoint stores (training's data / test config),
        defaults where it stores none."""
        train_cfg = info.train_config or {}
        data = train_cfg.get("data") or {}
        inference = InferenceConfig()
        for key, value in (train_cfg.get("test") or {}).items():
            if hasattr(inference, key):
                setattr(inference, key, value)
        return cls(metadata_from_dict(info.metadata, info.config.num_classes),
                   int(data.get("min_size_test", 800)), int(data.get("max_size_test", 1333)), inference)


def load_for_inference(checkpoint: str | os.PathLike,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, PredictorSettings]:
    """(model in eval mode on `device`, its PredictorSettings) from any weights file that
    `proscale.checkpoints.load_model` reads (strictly: every tensor must fit)."""
    model, info = load_model(checkpoint, device=device)
    return model, PredictorSettings.from_checkpoint(info)


def load_image(image: Any) -> torch.Tensor:
    """uint8 (3, H, W) RGB from a path, a PIL image, an (H, W[, 3|4]) array or a (3, H, W) tensor.
    Unreadable files raise proscale.data.ImageError / MissingFileError naming the file."""
    if isinstance(image, (str, os.PathLike)):
        from proscale.data.files import read_image

        array = read_image(str(image))
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W) RGB, got {tuple(t.shape)}")
        return t if t.dtype == torch.uint8 else t.float().clamp(0, 255).round().to(torch.uint8)
    elif hasattr(image, "convert"):  # PIL
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"an array image must be (H, W, 3) RGB, got {array.shape}")
        array = array[..., :3]
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"cannot read an image from a {type(image).__name__}")
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # PIL's buffers are read-only
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Predictor:
    """Runs a model on images, one at a time or in batches. `tasks` is any of "panoptic", "instance",
    "semantic" for a segmentation model (default: panoptic), "detection" for a detector (its only
    task and the default).

    checkpoint_or_model: a weights file `proscale.checkpoints.load_model` reads (a proscale
    checkpoint also brings its categories and test settings) or a MaskFormer / DeformableDETR
    (its `.metadata` when loaded from a file that has one; else pass `metadata`, or classes are
    named class_i and all are things).
    dtype: "fp32" (default), or "bf16" / "fp16" to run the model under autocast (post-processing
    stays fp32); refused with proscale.precision.PrecisionError on a CPU without the matrix
    units for it (AVX512-BF16 / AMX for bf16; see proscale/precision.py).
    """

    def __init__(self, checkpoint_or_model: str | os.PathLike | nn.Module, device: str | torch.device = "auto",
                 tasks: tuple[str, ...] | list[str] | str | None = None, metadata: DatasetMetadata | None = None,
                 inference: InferenceConfig | None = None, min_size_test: int | None = None,
                 max_size_test: int | None = None, dtype: str | torch.dtype = "fp32"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(checkpoint_or_model, nn.Module):
            self.model = checkpoint_or_model.to(self.device).eval()
            # a model from load_model / from_pretrained carries its class metadata
            settings = PredictorSettings(metadata_from_dict(getattr(self.model, "metadata", None),
                                                            self.model.num_classes))
        else:
            self.model, settings = load_for_inference(checkpoint_or_model, self.device)
        self.metadata = metadata or settings.metadata
        self.min_size_test = settings.min_size_test if min_size_test is None else min_size_test
        self.max_size_test = settings.max_size_test if max_size_test is None else max_size_test
        self.detector = isinstance(self.model, DeformableDETR)
        if tasks is None:
            tasks = ("detection",) if self.detector else ("panoptic",)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        allowed = ("detection",) if self.detector else SEGMENTATION_TASKS
        unknown = [t for t in tasks if t not in allowed]
        if unknown or not tasks:
            kind = "a detector" if self.detector else "a segmentation model"
            raise ValueError(f"tasks of {kind} must be among {', '.join(allowed)}, got {tasks}")
        self.tasks = tasks
        self.inference = dataclasses.replace(inference or settings.inference, panoptic_on="panoptic" in tasks,
                                             instance_on="instance" in tasks, semantic_on="semantic" in tasks)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        if self.min_size_test <= 0:
            return image
        from proscale.data.transforms import ResizeShortestEdge, resize

        h, w = image.shape[-2:]
        size = ResizeShortestEdge(self.min_size_test, self.max_size_test).output_size(h, w, self.min_size_test)
        return resize({"image": image}, size)["image"]

    def predict(self, image: Any, batch_size: int = 1) -> dict | list[dict]:
        """Results at the original image size (on the CPU), keys as the tasks ask:
        "panoptic": {"panoptic_seg": int32 (H, W), "segments_info": [{"id", "category_id", "isthing",
        "score", "area"}]}, "instances": {"masks": bool (N, H, W), "scores": (N,), "labels": (N,)},
        "sem_seg": float (K, H, W); a detector's "detections": {"boxes": (N, 4) (x0, y0, x1, y1)
        pixels, "scores": (N,), "labels": (N,)}, the top `test_topk_per_image` (query, class)
        scores. Category ids are contiguous indices into `self.metadata`.

        image: one image (see `load_image`), or a list / tuple of them: then a list of results in
        the same order, run `batch_size` images per forward where their padded sizes allow."""
        if isinstance(image, (list, tuple)):
            results: list = [None] * len(image)
            for index, _, result in self.predict_iter(image, batch_size):
                results[index] = result
            return results
        return next(self.predict_iter([image], 1))[2]

    def predict_iter(self, images: Iterable[Any], batch_size: int = 1,
                     max_pending: int | None = None) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """Yields (index in `images`, the image as uint8 (3, H, W), result) for every image, as
        its batch completes: not necessarily in input order. Images are read one by one and wait
        until `batch_size` images of their padded size are there; when `max_pending` images
        (default 4 x batch_size, at least 16) wait, the largest group runs as it is."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        max_pending = max_pending or max(4 * batch_size, 16)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        pending = 0
        for index, image in enumerate(images):
            original = load_image(image)
            x = self._resize(original)
            key = padded_shape(x.shape[-2:], self.model.size_divisibility)
            groups.setdefault(key, []).append((index, original, x))
            pending += 1
            if len(groups[key]) < batch_size:
                if pending < max_pending:
                    continue
                key = max(groups, key=lambda k: len(groups[k]))  # too many waiting: run the largest group
            batch = groups.pop(key)
            pending -= len(batch)
            yield from self._run(batch)
        for batch in groups.values():
            yield from self._run(batch)

    @torch.no_grad()
    def _run(self, batch: list[tuple[int, torch.Tensor, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor, dict]]:
        """One forward for images of one padded size; post-processing crops each to its own size."""
        with inference_autocast(self.device, self.dtype):
            outputs = self.model([x.to(self.device) for _, _, x in batch])
        outputs = outputs_to_float32(outputs)
        if self.detector:
            sizes = [(int(o.shape[-2]), int(o.shape[-1])) for _, o, _ in batch]
            results = [{"detections": {k: det[k] for k in ("boxes", "scores", "labels")}}
                       for det in detections(outputs, sizes, self.inference.test_topk_per_image)]
        else:
            meta = [{"height": int(o.shape[-2]), "width": int(o.shape[-1])} for _, o, _ in batch]
            results = postprocess(outputs, meta, self.inference, self.metadata.thing_classes)
        for (index, original, _), result in zip(batch, results):
            yield index, original, _to_cpu(result)

    __call__ = predict


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    return x


__all__ = ["Predictor", "PredictorSettings", "load_for_inference", "load_image", "metadata_from_dict"]
