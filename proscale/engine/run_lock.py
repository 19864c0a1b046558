"""One run per output folder: `RunLock(out)` holds an exclusive lock on OUT/.lock for the run.

Two `proscale train --out same` started a second apart would otherwise both run to the end,
interleaving one metrics.jsonl and overwriting each other's checkpoints. The lock is an
`fcntl.flock` on an open file, so the kernel releases it when the holder exits in any way
(including SIGKILL or a crash): a killed run never leaves a stale lock that blocks `--resume`.
The file also records who holds it (pid, host, start time, command) for the error message.
flock is per machine; on a network file system shared by several machines it may not exclude
a run on another machine (nor does any lock file that a crashed run leaves behind).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live process is training into this output folder."""


class RunLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        """Who wrote the lock file last ({} when unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            who = (f"process {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}: "
                   f"{h.get('command', '?')}") if h else "another process"
            raise RunFolderBusy(f"{self.path.parent} is in use by {who}. Wait for it to finish, stop it, or choose "
                                f"another --out.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
