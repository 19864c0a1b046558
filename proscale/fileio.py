"""The one atomic file write, and small JSON helpers (the bottom floor: imports nothing of proscale).

Everything proscale writes that a reader or a later run relies on (checkpoints, last_checkpoint,
config.yaml, reports, prediction PNGs, metrics.jsonl rewrites) goes through `atomic_write`:
a temp file beside the target, flushed and fsynced, renamed over it, then the folder fsynced.
A crash at any moment (even SIGKILL or power loss) leaves either the old file or the new one,
never half of one; a failed write leaves the old file untouched and no temp file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def _umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any thread starts.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
TEMP_SUFFIX = ".tmp"  # temp files are ".{name}.XXXX.tmp" beside the target


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes a rename in `folder` durable (a no-op where the file system cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Writes `data` (bytes, text as UTF-8, or a function that writes to a binary file object)
    to `path` atomically and durably; returns the path. Keeps an existing file's permissions."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    mode = (path.stat().st_mode & 0o777) if path.exists() else (0o666 & ~_UMASK)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)
    return path


def json_default(x: Any) -> Any:
    """For json.dumps: tensors and arrays as lists, paths and the rest as strings."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(data, indent=indent, default=json_default) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default
