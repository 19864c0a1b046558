"""proscale: Mask2Former with the PRO-SCALE encoder (progressive token length scaling).

    proscale.list_presets("proscale_*")                              # registered model names
    model = proscale.build_model("proscale_r50_333", num_classes=133)
    report = proscale.load_checkpoint(model, "model_final.pt")       # ours, detectron2 or HF names
    model, info = proscale.load_model("model_final_official.pth")      # any weights file -> its model
    model.save_pretrained("my_model/")                               # config.json + model.safetensors
    model = proscale.from_pretrained("my_model/")                    # ours, or a transformers folder
    results = proscale.Predictor("model_final.pt").predict("image.jpg")
"""
from __future__ import annotations

import copy

from proscale.config import DetrConfig, ModelConfig, apply_overrides
from proscale.presets import PRESETS, get_preset, list_presets

__version__ = "0.1.0"


def build_model(preset: str | ModelConfig | DetrConfig = "proscale_r50_333", num_classes: int | None = None,
                overrides: list[str] | None = None):
    """Builds a model (random weights) from a preset name (see `list_presets`) or a config: a
    ModelConfig gives a MaskFormer (segmentation), a DetrConfig a DeformableDETR (detection).
    A config passed in is left as it is: num_classes and overrides go to a copy."""
    from proscale.models.detr import build_detr
    from proscale.models.maskformer import build_maskformer

    cfg = get_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    if num_classes is not None:
        cfg.num_classes = num_classes
    if overrides:
        apply_overrides(cfg, overrides)
    if isinstance(cfg, DetrConfig):
        return build_detr(cfg)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_model needs a preset name, a ModelConfig or a DetrConfig, got {type(cfg).__name__}")
    return build_maskformer(cfg)


def __getattr__(name: str):
    # Heavier entry points load on first use, so `import proscale` stays light.
    if name in ("load_checkpoint", "load_model", "from_pretrained"):
        from proscale.checkpoints import loader

        return getattr(loader, name)
    if name == "Predictor":
        from proscale.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'proscale' has no attribute {name!r}")


__all__ = ["build_model", "load_checkpoint", "load_model", "from_pretrained", "Predictor", "list_presets", "get_preset", "PRESETS", "ModelConfig",
           "__version__"]
