"""Saving and loading checkpoints without ever running code from a file.

- `atomic_save(obj, path)`: writes a temp file beside `path`, fsyncs it, then `os.replace`s it:
  `path` holds either the old file or the complete new one, never half of one.
- `safe_load(path)`: `.pt/.pth/.bin/.ckpt` through `torch.load(weights_only=True)` (numpy arrays
  allowed), `.pkl` (detectron2) through a restricted unpickler that only rebuilds numpy arrays,
  `.safetensors` through safetensors. Errors are typed and always name the file.
- `load_checkpoint(model, path_or_state)`: detects the naming (proscale, detectron2 / the
  authors' release, Hugging Face), converts, compares with the model and returns a `LoadReport`.
- `save_model(model, path)` / `build_model_from_checkpoint(path)`: weights plus the model config,
  so a checkpoint rebuilds its own model.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from proscale.fileio import atomic_write

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors",)
SOURCES = ("auto", "proscale", "detectron2", "hf")

# Our own top-level module names; a state dict with these is already in proscale naming.
_OURS_PREFIXES = ("backbone.body.", "pixel_decoder.", "transformer_decoder.")
_D2_PREFIXES = ("sem_seg_head.", "backbone.stem.", "backbone.res", "backbone.patch_embed.", "backbone.layers.",
                "stem.", "res2.")
_HF_PREFIXES = ("model.pixel_level_module.", "model.transformer_module.", "pixel_level_module.",
                "transformer_module.", "class_predictor.")


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks to import or call something other than plain tensors / numpy arrays."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty or not a checkpoint at all."""


# --------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Serialises `obj` to `path` atomically; returns the path.

    fmt: "torch" (torch.save), "pickle" (protocol 4, detectron2 style) or "safetensors"
    (`obj` a flat {name: tensor} dict, or {"model": {...}, "config": ..., ...} whose other
    entries go into the metadata as JSON). Default: chosen by the suffix, torch otherwise.
    If serialisation fails, the temp file is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    fmt = fmt or _format_of(path, default="torch")
    writers = {"torch": lambda f: torch.save(obj, f), "pickle": lambda f: pickle.dump(obj, f, protocol=4),
               "safetensors": lambda f: f.write(_safetensors_bytes(obj))}
    if fmt not in writers:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return atomic_write(path, writers[fmt])


def _format_of(path: Path, default: str | None = None) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    return default


def _safetensors_bytes(obj: Mapping) -> bytes:
    from safetensors.torch import save

    metadata = None
    tensors = obj
    if isinstance(obj.get("model"), Mapping):
        tensors = obj["model"]
        metadata = {"proscale_" + k: json.dumps(v) for k, v in obj.items() if k != "model"}
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"safetensors holds only tensors; {name!r} is a {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return save(out, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Safe load
# --------------------------------------------------------------------------------------------
def _numpy_core():
    try:
        return importlib.import_module("numpy._core.multiarray"), importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray"), importlib.import_module("numpy.core.numeric")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: all a pickle of numpy arrays in an (Ordered)dict needs."""
    multiarray, numeric = _numpy_core()
    allowed = {("collections", "OrderedDict"): collections.OrderedDict,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer  # protocol-5 pickles of arrays
    allowed[("_codecs", "encode")] = _latin1_bytes  # how Python 3 writes bytes at protocol 2
    return allowed


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """Stands in for `_codecs.encode` in protocol-2 pickles: text -> bytes with a plain text codec only."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, dicts, lists and scalars; refuses every other global."""

    def __init__(self, file, source: str = "<stream>"):
        super().__init__(file, encoding="latin1")  # Python-2 era detectron2 pickles need latin1
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to load: the pickle asks for {module}.{name}, but only numpy arrays "
                f"and dicts are allowed in a .pkl checkpoint (nothing in it was executed)")
        return obj

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.source}: refusing to load: the pickle uses persistent ids "
                                    f"(a torch.save file? name it .pt / .pth)")


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, UnicodeDecodeError, OverflowError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable pickle (truncated or corrupt?): "
                                     f"{type(e).__name__}: {e}") from None


def _torch_safe_globals() -> list:
    multiarray, numeric = _numpy_core()
    items: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, numeric._frombuffer]
    items += [type(np.dtype(c)) for c in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "?")]
    # Files written under numpy 1.x name the functions numpy.core.*; newer torch accepts
    # (object, "qualified name") pairs for such aliases.
    items += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
              (multiarray.scalar, "numpy.core.multiarray.scalar"),
              (numeric._frombuffer, "numpy.core.numeric._frombuffer")]
    return items


def _load_torch(path: Path, safe_globals: Iterable = ()) -> Any:
    with warnings.catch_warnings():
        # torch warns about pickle protocols its own writer does not use; not the user's concern.
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return _load_torch_inner(path, safe_globals)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _load_torch_inner(path: Path, safe_globals: Iterable) -> Any:
    allowed = _torch_safe_globals() + list(safe_globals)
    if _torch_version() < (2, 6):  # (object, "qualified name") aliases arrived in torch 2.6
        allowed = [g for g in allowed if not isinstance(g, tuple)]
    context = getattr(torch.serialization, "safe_globals", None)
    try:
        if context is None:  # torch < 2.5: the process-wide allow-list
            torch.serialization.add_safe_globals(allowed)
            return torch.load(path, map_location="cpu", weights_only=True)
        with context(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "global" in text.lower() and "allowed" in text.lower():
            blocked = [line.strip() for line in text.splitlines() if "GLOBAL" in line]
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: it needs more than tensors ({blocked[0] if blocked else 'a blocked global'}); "
                f"nothing in it was executed") from None
        err: Exception = e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        err = e
    # Not a torch file: some releases name a plain (detectron2-style) pickle .pth.
    if not _is_zip(path):
        try:
            obj = _load_pickle(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError:
            obj = None
        if isinstance(obj, dict):
            return obj
    raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _load_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    try:
        tensors, metadata = {}, {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except Exception as e:  # SafetensorError has no stable import path across versions
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                     f"{type(e).__name__}: {e}") from None
    extra = {k[len("proscale_"):]: v for k, v in metadata.items() if k.startswith("proscale_")}
    if not extra:
        return tensors
    out: dict[str, Any] = {"model": tensors}
    for key, text in extra.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            raise CorruptCheckpointError(f"{path}: metadata entry {key!r} is not valid JSON") from None
    return out


def safe_load(path: str | os.PathLike, *, safe_globals: Iterable = ()) -> Any:
    """Loads a checkpoint file without executing anything from it (tensors on the CPU).

    .pt/.pth/.bin/.ckpt: torch.load(weights_only=True), numpy arrays allowed; `safe_globals`
    adds further allowed classes (torch's allow-list semantics). .pkl: numpy arrays in dicts only.
    .safetensors: the tensors, or {"model": tensors, ...} when written by proscale with metadata.
    Raises CheckpointError (missing / unknown kind), UnsafeCheckpointError, CorruptCheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty")
    fmt = _format_of(path)
    if fmt is None:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:4] == b"PK\x03\x04":
            fmt = "torch"
        elif len(head) == 9 and head[8:9] == b"{":
            fmt = "safetensors"
        else:
            raise CheckpointError(f"{path}: unknown checkpoint kind; expected one of "
                                  f"{', '.join(TORCH_SUFFIXES + PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    if fmt == "torch":
        return _load_torch(path, safe_globals)
    if fmt == "pickle":
        return _load_pickle(path)
    return _load_safetensors(path)


# --------------------------------------------------------------------------------------------
# Load into a model
# --------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What `load_checkpoint` did. `mismatched` holds (key, checkpoint shape, model shape)."""

    source: str
    path: str | None = None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # dropped on purpose (training-only buffers, ...)
    filled: list[str] = field(default_factory=list)  # not in the file, set to their default (BN counters)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        lines = [f"checkpoint{where} ({self.source} naming): {self.loaded} tensors loaded"
                 + ("" if self.ok else ", PROBLEMS below")]
        for title, items in (("missing (in the model, not in the checkpoint)", self.missing),
                             ("unexpected (in the checkpoint, not in the model)", self.unexpected)):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {k}" for k in _abbrev(items)]
        if self.mismatched:
            lines.append(f"  shape mismatch: {len(self.mismatched)}")
            lines += [f"    {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:20]]
            if len(self.mismatched) > 20:
                lines.append(f"    ... and {len(self.mismatched) - 20} more")
        if self.filled:
            lines.append(f"  set to defaults (not stored in this format): {len(self.filled)} "
                         f"({', '.join(sorted({k.rsplit('.', 1)[-1] for k in self.filled}))})")
        if self.ignored:
            lines.append(f"  ignored: {len(self.ignored)} ({', '.join(_abbrev(self.ignored, 6))})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _abbrev(keys: list[str], limit: int = 20) -> list[str]:
    return list(keys[:limit]) + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype == object:
            raise CheckpointError(f"{key}: holds Python objects, not numbers")
        return torch.from_numpy(np.array(arr, copy=True))
    if isinstance(value, (int, float, bool)):
        return torch.tensor(value)
    raise CheckpointError(f"{key}: expected a tensor or array, got {type(value).__name__}")


def extract_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, Any]:
    """The weights in a loaded checkpoint: obj["model"], obj["state_dict"] or obj itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of weights, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            # Lightning-style nesting or module wrappers: {"model": {"state_dict": ...}} / "module." prefixes.
            if key == "model" and isinstance(inner.get("state_dict"), Mapping):
                inner = inner["state_dict"]
            obj = inner
            break
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_source(state: Mapping[str, Any]) -> str:
    """"proscale", "detectron2" (Mask2Former / PRO-SCALE release) or "hf" (transformers)."""
    keys = list(state)
    score = {
        "proscale": sum(k.startswith(_OURS_PREFIXES) for k in keys),
        "detectron2": sum(k.startswith(_D2_PREFIXES) for k in keys),
        "hf": sum(k.startswith(_HF_PREFIXES) for k in keys),
    }
    best = max(score, key=score.get)
    if score[best] == 0:
        sample = ", ".join(keys[:5])
        raise CheckpointError(f"cannot tell the naming of this checkpoint (first keys: {sample}); pass source=")
    return best


def _hf_module():
    try:
        return importlib.import_module("proscale.checkpoints.from_hf")
    except ModuleNotFoundError as e:
        if e.name != "proscale.checkpoints.from_hf":
            raise
        return None


def convert_state_dict(state: Mapping[str, Any], source: str = "auto") -> tuple[dict[str, Any], str, list[str], list[str]]:
    """Any supported naming -> (proscale-named state, source, ignored keys, unmappable keys).

    detectron2 / HF values come back as tensors; proscale-named values pass through untouched
    (`load_converted` turns numpy arrays into tensors).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        source = detect_source(state)
    if source == "proscale":
        return dict(state), source, [], []
    if source == "detectron2":
        from proscale.checkpoints.from_detectron2 import from_detectron2_report

        converted, ignored, unmapped = from_detectron2_report(state)
        return converted, source, ignored, unmapped
    hf = _hf_module()
    tensors = {k: _as_tensor(v, k) for k, v in state.items()}
    if hf is not None and hasattr(hf, "map_hf_state_dict"):  # (state, ignored, unmapped): never raises
        converted, ignored, unmapped = hf.map_hf_state_dict(tensors)
        return dict(converted), source, list(ignored), list(unmapped)
    if hf is None or not hasattr(hf, "convert_hf_state_dict"):
        raise CheckpointError("this checkpoint uses Hugging Face naming, but proscale.checkpoints.from_hf "
                              "(convert_hf_state_dict) is not available")
    try:
        converted = hf.convert_hf_state_dict(tensors)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return dict(converted), source, [], []


def load_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                    source: str = "auto") -> LoadReport:
    """Loads weights into `model` from a file or an already loaded dict, in any supported naming.

    path_or_state: a path (see `safe_load`), a checkpoint dict ({"model": state, ...}) or a
    state dict. source: "auto", "proscale", "detectron2" or "hf".
    Compares every tensor with `model.state_dict()`. With `strict`, any missing, unexpected or
    shape-mismatched key raises CheckpointError naming them, and the model is left unchanged;
    otherwise the keys that fit are loaded and the report lists the rest.
    """
    path = None
    if isinstance(path_or_state, (str, os.PathLike)):
        path = str(path_or_state)
        obj = safe_load(path_or_state)
    else:
        obj = path_or_state
    where = path or "checkpoint"
    state = extract_state_dict(obj, where)
    try:
        converted, source, ignored, unmapped = convert_state_dict(state, source)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return load_converted(model, converted, source, ignored, unmapped, strict=strict, path=path)


def load_converted(model: nn.Module, converted: Mapping[str, Any], source: str, ignored: Iterable[str] = (),
                   unmapped: Iterable[str] = (), strict: bool = True, path: str | None = None) -> LoadReport:
    """Loads an already converted (proscale-named) state; `unmapped` keys count as unexpected.
    See `load_checkpoint`."""
    report = LoadReport(source=source, path=path, ignored=list(ignored))
    target = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        tensor = _as_tensor(value, key)
        if tuple(tensor.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(target[key].shape)))
            continue
        to_load[key] = tensor
    report.unexpected += [k for k in unmapped if k not in report.unexpected]
    for key in target:
        if key in converted:
            continue
        if key.endswith("num_batches_tracked") and source != "proscale":
            report.filled.append(key)  # other formats do not store BatchNorm's step counter
        else:
            report.missing.append(key)
    _add_notes(model, report)
    if strict and not report.ok:
        raise CheckpointError(f"{path or 'checkpoint'} does not fit the model:\n{report}")
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
        for key in report.filled:  # reset, so a re-load gives the same model
            target[key].zero_()
    report.loaded = len(to_load)
    return report


def _add_notes(model: nn.Module, report: LoadReport) -> None:
    if report.source == "detectron2":
        enc = getattr(getattr(model, "pixel_decoder", None), "encoder", None)
        trc = getattr(enc, "trc", None)
        if trc is not None and trc.layout != "official":
            report.notes.append(f"TRC layout is {trc.layout!r}; the authors' released weights were trained "
                                f"with the 'official' layout")
    if any(k.startswith("backbone.norm") for k in report.unexpected):
        report.notes.append("backbone.norm{i}: detectron2's Swin normalises each output stage; proscale's timm "
                            "backbone has no such norms, so these weights cannot be used")


# --------------------------------------------------------------------------------------------
# Whole-model checkpoints
# --------------------------------------------------------------------------------------------
def save_model(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes {"model": state_dict, "config": to_dict(model.cfg), "proscale_version"} atomically.

    The suffix picks the format: .pt/.pth (torch) or .safetensors (config in the metadata).
    """
    import proscale
    from proscale.config import to_dict

    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise CheckpointError("the model has no .cfg; build it with proscale.build_model to save a whole-model "
                              "checkpoint")
    obj: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                           "config": _plain(to_dict(cfg)), "proscale_version": proscale.__version__}
    if extra:
        obj.update(extra)
    fmt = _format_of(Path(path), default="torch")
    if fmt == "pickle":
        raise CheckpointError(f"{path}: save proscale checkpoints as .pt or .safetensors (use convert --to "
                              f"detectron2 for a .pkl)")
    return atomic_save(obj, path, fmt=fmt)


def _plain(value: Any) -> Any:
    """Config dicts made of str / int / float / bool / None / lists only (safe for weights_only and JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_from_checkpoint(obj: Mapping[str, Any], where: str = "checkpoint"):
    """The ModelConfig stored in a proscale checkpoint, or None when there is none."""
    from proscale.config import ModelConfig, from_dict

    data = obj.get("config") if isinstance(obj, Mapping) else None
    if data is None:
        return None
    if dataclasses.is_dataclass(data):
        return data
    try:
        return from_dict(ModelConfig, data)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: stored config does not fit this proscale version: {e}") from None


def build_model_from_checkpoint(path: str | os.PathLike, strict: bool = True, source: str = "auto"):
    """Rebuilds the model a checkpoint describes and loads its weights; returns it in eval mode.

    Uses the stored config of a proscale checkpoint; for a file without one (detectron2 / HF
    weights) the config is inferred from the weights (see from_detectron2.infer_config).
    """
    from proscale.models.maskformer import build_maskformer

    obj = safe_load(path)
    cfg = config_from_checkpoint(obj, str(path)) if isinstance(obj, Mapping) else None
    if cfg is None:
        from proscale.checkpoints.from_detectron2 import infer_config

        state = extract_state_dict(obj, str(path))
        converted, src, _, _ = convert_state_dict(state, source)
        cfg = infer_config(converted, trc_layout="official" if src == "detectron2" else "spatial")
    model = build_maskformer(cfg)
    load_checkpoint(model, obj, strict=strict, source=source)
    return model.eval()
