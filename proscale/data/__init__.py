"""Data sets, transforms and batching. Samples and batches follow docs/INTERFACES.md."""
from proscale.data.build import build_dataset, parse_spec
from proscale.data.coco_instances import CocoInstancesDataset, decode_segmentation
from proscale.data.coco_panoptic import CocoPanopticDataset
from proscale.data.collate import (ResumableBatchSampler, build_dataloader, collate, mix_seed,
                                   set_epoch)
from proscale.data.errors import (KINDS, AnnotationError, DataError, ImageError,
                                  MissingFileError, Problem)
from proscale.data.metadata import IGNORE_LABEL, Category, DatasetMetadata, palette
from proscale.data.semantic import SemanticDataset, read_sem_seg
from proscale.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticParams, generate_synthetic
from proscale.data.transforms import (FixedSizeCrop, RandomFlip, ResizeShortestEdge, ScaleJitter,
                                      TransformConfig, build_transforms)
from proscale.data.validate import SkipBadSamples, ValidationReport, validate_dataset

__all__ = [
    "build_dataset", "parse_spec", "CocoInstancesDataset", "decode_segmentation",
    "CocoPanopticDataset", "ResumableBatchSampler", "build_dataloader", "collate", "mix_seed",
    "set_epoch", "AnnotationError", "DataError", "ImageError", "MissingFileError", "IGNORE_LABEL",
    "Category", "DatasetMetadata", "palette", "SemanticDataset", "read_sem_seg",
    "SYNTHETIC_CATEGORIES", "SyntheticParams", "generate_synthetic", "FixedSizeCrop", "RandomFlip",
    "ResizeShortestEdge", "ScaleJitter", "TransformConfig", "build_transforms", "KINDS", "Problem",
    "SkipBadSamples", "ValidationReport", "validate_dataset",
]
