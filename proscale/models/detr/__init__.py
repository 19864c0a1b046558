"""Deformable DETR (detection) with the plan-driven encoder: detector, decoder, heads, loss, post-processing."""
from proscale.models.detr.detector import DeformableDETR, build_detr

__all__ = ["DeformableDETR", "build_detr"]
