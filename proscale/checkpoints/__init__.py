"""Checkpoints: atomic save, safe load (no code from files), converters from other namings.

    from proscale.checkpoints import load_checkpoint, save_model, build_model_from_checkpoint
    report = load_checkpoint(model, "model_final.pkl")   # detectron2, HF or proscale naming
    print(report)                                         # missing / unexpected / mismatched keys
"""
from proscale.checkpoints.io import (
    CheckpointError,
    CorruptCheckpointError,
    LoadReport,
    UnsafeCheckpointError,
    atomic_save,
    build_model_from_checkpoint,
    convert_state_dict,
    detect_source,
    load_checkpoint,
    safe_load,
    save_model,
)
from proscale.checkpoints.from_detectron2 import from_detectron2, infer_config, to_detectron2

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError", "LoadReport",
    "atomic_save", "safe_load", "load_checkpoint", "save_model", "build_model_from_checkpoint",
    "convert_state_dict", "detect_source", "from_detectron2", "to_detectron2", "infer_config",
]
