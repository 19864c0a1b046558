"""OpenMP settings for a shared CPU, applied by the `proscale` command before torch loads.

torch's OpenMP threads (GNU libgomp in the pip wheels) busy-wait ("spin") at the end of every
parallel region before they sleep. Alone on a machine that is the fastest policy. On a machine
that other jobs also use, a thread spins on a core whose owner is descheduled, the region ends
only when every thread has had its turn, and a process slows far beyond its share: with three
trainings on 2 cores a nano training step went from ~0.3 s to 12-16 s, 40x rather than 3x.
With `OMP_WAIT_POLICY=PASSIVE` an idle thread sleeps at once and gives the core back, so a busy
machine slows each job in proportion to the load (benchmarks/busy.py measures both; the numbers
are in docs/speed.md).

libgomp reads its environment once, when it is loaded (at `import torch`): `configure()` has to
run before that, so the command calls it first thing (proscale/cli.py) and a library user sets
the variable in the shell. A setting the user made (OMP_WAIT_POLICY, or GOMP_SPINCOUNT, which
tunes the same wait) is always kept; `PROSCALE_OMP_POLICY=torch` keeps torch's defaults.
This module imports nothing heavy (no torch).
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

POLICY_ENV = "PROSCALE_OMP_POLICY"  # "passive" (the command's default) or "torch" (leave torch's defaults)
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def configure(environ: MutableMapping[str, str] | None = None, torch_loaded: bool | None = None) -> str:
    """Sets OMP_WAIT_POLICY=PASSIVE in `environ` (default os.environ) unless the user chose a wait
    policy or PROSCALE_OMP_POLICY=torch. Returns what happened, in words: "set PASSIVE", "kept
    user setting ...", "torch defaults (PROSCALE_OMP_POLICY=torch)" or "too late: torch already loaded"."""
    env = os.environ if environ is None else environ
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    choice = env.get(POLICY_ENV, "passive").strip().lower()
    if choice not in ("passive", "torch"):
        raise ValueError(f"{POLICY_ENV}={choice!r}: expected 'passive' or 'torch'")
    if choice == "torch":
        return f"torch defaults ({POLICY_ENV}=torch)"
    user = [k for k in USER_KEYS if k in env]
    if user:
        return "kept user setting " + ", ".join(f"{k}={env[k]}" for k in user)
    if torch_loaded:
        return "too late: torch already loaded"
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return "set PASSIVE"
