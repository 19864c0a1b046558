"""What the quickstart prints while it runs: stage lines and progress bars, both on stderr (stdout
carries only the final table)."""
from __future__ import annotations

import sys

from tqdm import tqdm

from proscale.quickstart.config import QuickstartConfig


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress_bar(cfg: QuickstartConfig, **kw) -> tqdm:
    """A tqdm bar (keyword arguments as tqdm's), silent when `cfg.progress` is off."""
    return tqdm(disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr, mininterval=0.5, **kw)
