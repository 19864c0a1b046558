"""Evaluators: panoptic quality, COCO mask AP, semantic mIoU.

Each has reset() / process(...) per image / evaluate() -> dict (percent), and gathers over
torch.distributed ranks in evaluate(), returning the same numbers on every rank.
"""
from proscale.evaluation.instances import InstanceEvaluator, encode_masks
from proscale.evaluation.panoptic import (
    PanopticEvaluator, PQStat, format_pq_table, pq_compute_single, pq_summary,
)
from proscale.evaluation.semantic import SemanticEvaluator, semantic_from_panoptic

__all__ = [
    "PanopticEvaluator", "InstanceEvaluator", "SemanticEvaluator",
    "pq_compute_single", "pq_summary", "PQStat", "format_pq_table",
    "encode_masks", "semantic_from_panoptic",
]
