"""Model parts, in data-flow order: backbone -> pixel decoder (encoder) -> transformer decoder."""
from proscale.models.maskformer import MaskFormer, build_maskformer

__all__ = ["MaskFormer", "build_maskformer"]
