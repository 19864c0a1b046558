"""Training checkpoints: the whole state of a run, written atomically, the last K kept.

A training checkpoint is a whole-model checkpoint written atomically by
`proscale.checkpoints.io.save_model` ({"model", "config", "proscale_version"}; read back with
`safe_load`), plus what a resumed run needs:
    "iteration"        optimizer steps done
    "optimizer", "scheduler", "scaler"   their state_dicts
    "rng"              per rank: python / numpy / torch / cuda generator states
    "data"             batches each rank has consumed, and the batch layout they came in
    "metadata"         the data set's categories (a Predictor names and colours classes with them)
    "train_config"     the TrainConfig as a plain dict
Files: OUT/model_0005000.pt (periodic, the last `keep_last` kept), OUT/model_final.pt, and
OUT/last_checkpoint naming the newest one (what --resume reads).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
import numpy as np
import torch

LAST = "last_checkpoint"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pt$")


def checkpoint_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pt"


def rng_state() -> dict:
    """This process's generator states, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def write_last(out_dir: str | os.PathLike, name: str) -> None:
    """Points OUT/last_checkpoint at `name` (atomically)."""
    tmp = Path(out_dir) / f".{LAST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(out_dir) / LAST)


def _periodic(out: Path) -> list[Path]:
    """OUT/model_XXXXXXX.pt files, oldest first."""
    return sorted((p for p in out.glob("model_*.pt") if _PERIODIC.match(p.name)), key=lambda p: p.name)


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint OUT/last_checkpoint names, else the newest model_*.pt, else None."""
    out = Path(out_dir)
    pointer = out / LAST
    if pointer.is_file():
        path = out / pointer.read_text().strip()
        if path.is_file():
            return path
    periodic = _periodic(out)
    return periodic[-1] if periodic else None


def prune(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` periodic checkpoints (keep_last <= 0 keeps all).
    model_final.pt and whatever last_checkpoint names are never deleted."""
    if keep_last <= 0:
        return []
    out = Path(out_dir)
    pointer = out / LAST
    protected = pointer.read_text().strip() if pointer.is_file() else None
    removed = []
    for p in _periodic(out)[:-keep_last]:
        if p.name != protected:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
