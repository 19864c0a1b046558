"""Inference precision: `--dtype fp32|bf16|fp16` and the check that the hardware has the units.

Reduced precision runs under `torch.autocast` (weights stay fp32; convolutions, linear layers
and matmuls run in the low precision, see `inference_autocast`). The deformable attention keeps
its sampling locations, softmax and bilinear accumulation in fp32 whatever the autocast dtype
(proscale/models/ms_deform_attn.py): a bf16 location has 8 significant bits, half a pixel at a
width of 136.

On a CPU, bf16 pays only with bf16 matrix units (AVX512-BF16, or AMX on recent Xeons): without
them oneDNN emulates bf16 with fp32 arithmetic plus conversions, slower than fp32. So bf16 on a
CPU without them is refused (`PrecisionError`) rather than run slowly; fp16 on a CPU likewise
needs AMX-FP16 or AVX512-FP16. CUDA takes both (fp16 everywhere, bf16 from Ampere on, as torch
decides). `PROSCALE_FORCE_DTYPE=1` skips the CPU check (to measure the emulated path).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU feature flags (/proc/cpuinfo names) that make each reduced precision worth running.
CPU_UNITS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
FORCE_ENV = "PROSCALE_FORCE_DTYPE"


class PrecisionError(ValueError):
    """A dtype the device cannot run fast (names the dtype, the device and what is missing)."""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_units(name: str) -> tuple[str, ...]:
    """The matrix-unit flags this CPU has for `name` ("bf16" or "fp16"), best first."""
    flags = cpu_flags()
    return tuple(f for f in CPU_UNITS.get(name, ()) if f in flags)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """torch dtype for `name` ("fp32", "bf16", "fp16"), after checking that `device` runs it on
    its own units; raises PrecisionError with the reason otherwise."""
    if isinstance(name, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == name), str(name))
    if name not in DTYPES:
        raise PrecisionError(f"unknown dtype {name!r}: expected one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if name != "fp32" and device.type == "cpu" and os.environ.get(FORCE_ENV) != "1" and not cpu_units(name):
        wanted = " or ".join(CPU_UNITS[name])
        raise PrecisionError(
            f"--dtype {name} on this CPU would be emulated with fp32 arithmetic (slower than fp32): it has no "
            f"{name} matrix units ({wanted} in /proc/cpuinfo). Use --dtype fp32, or set {FORCE_ENV}=1 to run it anyway.")
    return DTYPES[name]


def inference_autocast(device: str | torch.device, dtype: torch.dtype):
    """The autocast context that runs a model in `dtype` (a no-op for fp32)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def outputs_to_float32(x):
    """A model's outputs (tensors in dicts / lists) with bf16 / fp16 tensors made fp32, for
    post-processing (mask resizes, sigmoid products and scores stay in full precision)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, dict):
        return {k: outputs_to_float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(outputs_to_float32(v) for v in x)
    return x


def add_dtype_argument(parser, default: str = "fp32") -> None:
    """`--dtype` for a command that runs models at inference."""
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default,
                        help="inference precision (autocast): bf16 needs AVX512-BF16 / AMX on a CPU, and is refused "
                             "without them")
