"""Small per-input-size caches for constant tensors (reference points, position encodings...).

Building such constants on every call costs host-to-device copies and, on a GPU at batch 1,
more time than PRO-SCALE saves: its 9 layers would each rebuild them, against the baseline's 6.
They are built once per (size, device, dtype) and reused.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch


class ConstantCache:
    """An LRU dict of tensors that never hold autograd or inference-mode state."""

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._data: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return build()  # let the compiler trace and fold it
        value = self._data.get(key)
        if value is None:
            # Outside inference mode and grad mode: a tensor made under torch.inference_mode()
            # could not be used later in a training step.
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self._data[key] = value
            if len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        else:
            self._data.move_to_end(key)
        return value
