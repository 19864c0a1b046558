"""CPU runtime settings the `proscale` command applies before torch loads: the OpenMP wait
(shared machines) and glibc's malloc keeping freed memory (page faults).

torch's OpenMP threads (GNU libgomp in the pip wheels) busy-wait ("spin") at the end of every
parallel region before they sleep. Alone on a machine that is the fastest policy. On a machine
that other jobs also use, a thread spins on a core whose owner is descheduled, the region ends
only when every thread has had its turn, and a process slows far beyond its share: with three
trainings on 2 cores a nano training step went from ~0.3 s to 12-16 s, 40x rather than 3x.
With `GOMP_SPINCOUNT=1000` an idle thread spins only briefly (libgomp's own count when it
knows it has more threads than cores) and then sleeps, giving the core back, so a busy machine
slows each job in proportion to the load, while a job alone keeps nearly all of the spinning's
speed. `OMP_WAIT_POLICY=PASSIVE` (sleep at once) is as fair but slower alone: small operators
pay a wake-up each (benchmarks/busy.py, 2-core machine: a nano training step alone 0.18 s with
torch's defaults, 0.19 s with spin 1000, 0.31 s passive; two jobs at once 3.9x, 2.2x and 0.8x
their time alone; docs/speed.md).

libgomp reads its environment once, when it is loaded (at `import torch`): `configure()` has to
run before that, so the command calls it first thing (proscale/cli.py) and a library user sets
the variable in the shell. A setting the user made (OMP_WAIT_POLICY, or GOMP_SPINCOUNT, which
tunes the same wait) is always kept; `PROSCALE_OMP_POLICY=torch` keeps torch's defaults.

Page faults. glibc's malloc serves every allocation above 128 KB (adaptively up to 32 MB) with
a fresh mmap and returns it to the kernel on free, so every large temporary of a forward
(a 17,850 x 1024 FFN activation is 73 MB) is paged in again, a minor fault per 4 KB page: about
216,000 faults per PRO-SCALE R50 pixel-decoder forward at 800x1088 and 500,000 per whole model
(measured with getrusage). `keep_freed_memory()` raises the mmap threshold to 1 GiB and the trim
threshold to 2 GiB (mallopt through ctypes), after which the second forward takes ~0 faults;
the process keeps its peak heap instead of returning it. `PROSCALE_MALLOC=default` keeps
glibc's defaults. Library users may call `keep_freed_memory()` themselves.

This module imports nothing heavy (no torch).
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import MutableMapping

POLICY_ENV = "PROSCALE_OMP_POLICY"  # "spin1k" (the command's default) or "torch" (leave torch's defaults)
SPINCOUNT = "1000"
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
MALLOC_ENV = "PROSCALE_MALLOC"  # "keep" (the command's default) or "default" (glibc's own thresholds)
# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 30  # allocations below this come from the heap, and stay there when freed
TRIM_THRESHOLD = 2**31 - 1  # free heap top kept up to this size (mallopt takes an int)


def keep_freed_memory() -> bool:
    """glibc only: keep freed memory in the process for the next allocation (module docstring).
    Returns whether both settings took (False off glibc, e.g. macOS or musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def configure_malloc(environ: MutableMapping[str, str] | None = None) -> str:
    """keep_freed_memory() unless PROSCALE_MALLOC=default; returns what happened, in words."""
    env = os.environ if environ is None else environ
    choice = env.get(MALLOC_ENV, "keep").strip().lower()
    if choice not in ("keep", "default"):
        raise ValueError(f"{MALLOC_ENV}={choice!r}: expected 'keep' or 'default'")
    if choice == "default":
        return f"glibc defaults ({MALLOC_ENV}=default)"
    return "kept freed memory" if keep_freed_memory() else "not glibc: malloc left as it is"


def configure(environ: MutableMapping[str, str] | None = None, torch_loaded: bool | None = None) -> str:
    """Sets GOMP_SPINCOUNT=1000 in `environ` (default os.environ) unless the user chose a wait
    policy or PROSCALE_OMP_POLICY=torch. Returns what happened, in words: "set GOMP_SPINCOUNT=1000",
    "kept user setting ...", "torch defaults (PROSCALE_OMP_POLICY=torch)" or "too late: torch
    already loaded"."""
    env = os.environ if environ is None else environ
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    choice = env.get(POLICY_ENV, "spin1k").strip().lower()
    if choice not in ("spin1k", "torch"):
        raise ValueError(f"{POLICY_ENV}={choice!r}: expected 'spin1k' or 'torch'")
    if choice == "torch":
        return f"torch defaults ({POLICY_ENV}=torch)"
    user = [k for k in USER_KEYS if k in env]
    if user:
        return "kept user setting " + ", ".join(f"{k}={env[k]}" for k in user)
    if torch_loaded:
        return "too late: torch already loaded"
    env["GOMP_SPINCOUNT"] = SPINCOUNT
    return f"set GOMP_SPINCOUNT={SPINCOUNT}"
