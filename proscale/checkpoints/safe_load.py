"""Reading checkpoint files without ever running code from them.

- `.pt/.pth/.bin/.ckpt`: `torch.load(weights_only=True)`, numpy arrays allowed; a plain pickle
  named `.pth` (some releases) goes through the restricted unpickler below.
- `.pkl` (detectron2): a restricted unpickler that only rebuilds numpy arrays in dicts.
- `.safetensors`: the tensors, plus the JSON metadata proscale writes beside them.
Errors are typed (proscale.checkpoints.errors) and always name the file.
"""
from __future__ import annotations

import collections
import importlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from proscale.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pkl", ".pickle")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Metadata keys proscale writes into .safetensors files carry this prefix (values are JSON).
SAFETENSORS_META_PREFIX = "proscale_"


def checkpoint_format(path: Path, default: str | None = None) -> str | None:
    """"torch", "pickle" or "safetensors" by the suffix of `path`; `default` for other suffixes."""
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    return default


# --------------------------------------------------------------------------------------------
# Pickles (detectron2 .pkl): numpy arrays in dicts, nothing else
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


# --------------------------------------------------------------------------------------------
# torch files: weights_only, numpy arrays allowed
# --------------------------------------------------------------------------------------------
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


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _load_torch(path: Path, safe_globals: Iterable = ()) -> Any:
    with warnings.catch_warnings():
        # torch warns about pickle protocols its own writer does not use; not the user's concern.
        warnings.filterwarnings("ignore", message=".*pickle protocol.*")
        return _load_torch_weights_only(path, safe_globals)


def _load_torch_weights_only(path: Path, safe_globals: Iterable) -> Any:
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


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
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
    prefix = SAFETENSORS_META_PREFIX
    extra = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
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
    fmt = checkpoint_format(path)
    if fmt is None:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[:4] == b"PK\x03\x04":
            fmt = "torch"
        elif len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
            fmt = "safetensors"
        else:
            raise CheckpointError(f"{path}: unknown checkpoint kind; expected one of "
                                  f"{', '.join(TORCH_SUFFIXES + PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    if fmt == "torch":
        return _load_torch(path, safe_globals)
    if fmt == "pickle":
        return _load_pickle(path)
    return _load_safetensors(path)
