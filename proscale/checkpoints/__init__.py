"""Checkpoints: one path from any weights file to a model; safe reading, atomic writing, converters.

    from proscale.checkpoints import load_model, load_checkpoint, save_model
    model, info = load_model("model_final.pkl")       # proscale .pt, detectron2 .pkl/.pth, HF folder
    print(info.report)                                 # missing / unexpected / mismatched keys
    report = load_checkpoint(model, "other.pt")        # into a model you built, any naming
    model = from_pretrained("folder/")                 # save_pretrained folders: ours or transformers'
    save_hf_pretrained(model, "hf_folder/")            # a folder transformers' Mask2Former loads

Layers, lowest first: errors -> state_dict, safe_load -> load_state -> from_detectron2, from_hf
-> loader (load_checkpoint, load_model, from_pretrained), to_hf -> io (atomic_save, save_model)
-> convert (the command). The save_pretrained folder format is written by the model
(proscale.models.pretrained) and read by the loader.
"""
from proscale.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from proscale.checkpoints.from_detectron2 import from_detectron2, infer_config, to_detectron2
from proscale.checkpoints.io import atomic_save, save_model
from proscale.checkpoints.load_state import LoadReport
from proscale.checkpoints.loader import (CheckpointInfo, convert_state_dict, from_pretrained, load_checkpoint,
                                         load_model)
from proscale.checkpoints.safe_load import safe_load
from proscale.checkpoints.state_dict import detect_source
from proscale.checkpoints.to_hf import save_hf_pretrained

__all__ = [
    "CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError", "LoadReport", "CheckpointInfo",
    "atomic_save", "safe_load", "load_checkpoint", "load_model", "from_pretrained", "save_model", "save_hf_pretrained",
    "convert_state_dict", "detect_source", "from_detectron2", "to_detectron2", "infer_config",
]
