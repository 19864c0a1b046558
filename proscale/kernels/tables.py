"""Small constant tensors (level shapes, level starts) cached per input size and device.

The MSDA back ends need per-level constants as tensors. Building them from Python ints on every
call means a host-to-device copy per layer call: the host waits for each copy, and at batch 1 on
a GPU, where an encoder layer's kernels take well under a millisecond, those waits add up to
more than the shorter token sequences of PRO-SCALE's early stages save. They are built once per
(key, device) and reused. This module depends on nothing else in proscale.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

_CACHE: OrderedDict[Hashable, object] = OrderedDict()
_MAX_ENTRIES = 64


def cached(key: Hashable, build: Callable[[], object]) -> object:
    """Returns build() for this key, built once (LRU, never while a compiler is tracing)."""
    if torch.compiler.is_compiling():
        return build()  # let the compiler trace and fold it
    value = _CACHE.get(key)
    if value is None:
        # Outside inference mode and grad mode: a tensor made under torch.inference_mode() could
        # not be used later in a training step.
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        _CACHE[key] = value
        if len(_CACHE) > _MAX_ENTRIES:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return value


def level_starts(spatial_shapes, pad: int = 0) -> list[int]:
    """Index of each level's first token in the concatenated sequence (levels padded by `pad`)."""
    starts, s = [], 0
    for h, w in spatial_shapes:
        starts.append(s)
        s += (h + 2 * pad) * (w + 2 * pad)
    return starts


def shape_table(spatial_shapes, device: torch.device) -> torch.Tensor:
    """(L, 3) int32 rows (H_l, W_l, start_l) on `device`, cached per size."""
    key = ("shape_table", spatial_shapes, torch.device(device))

    def build() -> torch.Tensor:
        rows = [[h, w, s] for (h, w), s in zip(spatial_shapes, level_starts(spatial_shapes))]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    return cached(key, build)


def normalize_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
    """((H, W), ...) as Python ints. A tensor is accepted but costs a host sync: pass ints."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return tuple((int(h), int(w)) for h, w in spatial_shapes)
