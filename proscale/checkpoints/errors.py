"""The errors every checkpoint reader raises. Each message names the file and the problem.

This module imports nothing from proscale, so the readers, the converters and the loaders can
all raise the same errors without importing one another.
"""
from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks to import or call something other than plain tensors / numpy arrays."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, empty or not a checkpoint at all."""
