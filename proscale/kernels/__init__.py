"""Accelerated multi-scale deformable attention (MSDA) back ends and the dispatch between them.

Back ends, one file each, all with the same contract (value (B, S, M, D), spatial_shapes
((H, W), ...) Python ints, sampling_locations (B, Nq, M, L, P, 2), attention_weights
(B, Nq, M, L, P) -> (B, Nq, M*D)):

  "pure"    msda_pure.py: grid_sample per level (the reference; what exports and FLOP
            counters see)
  "fused"   msda_fused.py: one embedding_bag gather over all levels and points, hand-written
            backward (plain PyTorch; the fast path on CPU, and on CUDA without Triton)
  "triton"  msda_triton.py: Triton kernels, forward and backward (CUDA)

`ms_deform_attn` is the one entry point (proscale.models.ms_deform_attn.MSDeformAttn calls it
with its `backend` attribute). A named back end runs as asked, even while tracing. "auto" (the
default) picks one per call:
  * "pure" while tracing, exporting or compiling (torch.jit trace, ONNX, torch.export,
    torch.compile), always: exported graphs then hold the standard GridSample op, and FLOP
    counters see grid_sample;
  * else the environment variable PROSCALE_MSDA=pure|fused|triton if set (read on every call,
    so tests and benchmarks can flip it);
  * else "triton" for CUDA tensors when Triton imports (not float64: the kernels accumulate in
    fp32), and "fused" otherwise. On CUDA without Triton, "fused" is the default for its memory
    (it keeps only its inputs for backward); benchmarks/gpu.py times it against "pure".
Nothing here is required: without Triton everything runs on the PyTorch paths. This package
imports nothing from proscale.models: the model imports its kernels, never the other way round.
"""
from __future__ import annotations

import functools
import os

import torch

from proscale.kernels.msda_fused import ms_deform_attn_fused
from proscale.kernels.msda_pure import ms_deform_attn_pure
from proscale.kernels.tables import normalize_shapes

BACKENDS = ("pure", "fused", "triton")
AUTO = "auto"  # select_backend() per call
ENV_VAR = "PROSCALE_MSDA"

__all__ = ["AUTO", "BACKENDS", "ENV_VAR", "check_backend", "ms_deform_attn", "ms_deform_attn_fused",
           "ms_deform_attn_pure", "select_backend", "tracing", "triton_available", "triton_interpreter"]


@functools.lru_cache(maxsize=None)
def _triton_module():
    """The kernel module, or None when Triton (or a kernel in it) cannot be imported."""
    try:
        from proscale.kernels import msda_triton
    except Exception:  # ImportError, or an old Triton failing while decorating the kernels
        return None
    return msda_triton


def triton_available() -> bool:
    """True when Triton and the MSDA kernels import (they run on CUDA, or anywhere under the
    Triton interpreter, see triton_interpreter())."""
    return _triton_module() is not None


def triton_interpreter() -> bool:
    """True when TRITON_INTERPRET=1: kernels then run (slowly) on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tracing() -> bool:
    """True while torch.jit traces / scripts, torch.compile or torch.export traces, or ONNX exports."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return bool(torch.onnx.is_in_onnx_export())


def check_backend(backend: str) -> str:
    """`backend` if `ms_deform_attn` knows it ("auto" or one of BACKENDS), else ValueError."""
    if backend != AUTO and backend not in BACKENDS:
        raise ValueError(f"unknown MSDA back end {backend!r}; expected {AUTO!r} or one of {BACKENDS}")
    return backend


def select_backend(value: torch.Tensor) -> str:
    """The back end "auto" stands for on this tensor (honours PROSCALE_MSDA)."""
    if tracing():
        return "pure"
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {BACKENDS}")
        return forced
    if value.is_cuda and value.dtype != torch.float64 and triton_available():
        return "triton"  # the kernels accumulate in fp32; float64 (gradcheck) stays on "fused"
    return "fused"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str = AUTO,
) -> torch.Tensor:
    """Multi-scale deformable attention core on `backend` ("auto": the fastest for this tensor).

    Args:
        value: (B, S, M, D) projected values, levels concatenated in `spatial_shapes` order.
        spatial_shapes: ((H_0, W_0), ...) of the L levels, Python ints.
        sampling_locations: (B, Nq, M, L, P, 2) as (x, y) in [0, 1] of each level's map.
        attention_weights: (B, Nq, M, L, P), softmaxed over L * P.
        backend: "pure" | "fused" | "triton" (runs as asked, even while tracing), or "auto":
            select_backend(value).
    Returns:
        (B, Nq, M * D) in value's dtype.
    """
    spatial_shapes = normalize_shapes(spatial_shapes)
    if check_backend(backend) == AUTO:
        backend = select_backend(value)
    if backend == "fused":
        return ms_deform_attn_fused(value, spatial_shapes, sampling_locations, attention_weights)
    if backend == "triton":
        module = _triton_module()
        if module is None:
            raise RuntimeError("MSDA back end 'triton' requested but Triton is not importable")
        if not value.is_cuda and not triton_interpreter():
            raise RuntimeError("MSDA back end 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        return module.ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_pure(value, spatial_shapes, sampling_locations, attention_weights)
