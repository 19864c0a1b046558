"""Linear layers for fp32 CPU inference through oneDNN.

`F.linear` in fp32 on a CPU runs MKL's sgemm, which is known to choose its kernels by CPU
vendor (no AVX-512 kernels on AMD CPUs): on the development EPYC (AVX-512) the encoder's linear
layers ran at 85-90 GMAC/s, where oneDNN's matmul, the kernel torch.compile's CPU back end
calls, reaches 180-200 and fuses the FFN's ReLU (docs/speed.md, "Where the fp32 time went"). oneDNN ships
inside torch (`torch.ops.mkldnn._linear_pointwise`): no extension to build.

The oneDNN call has no autograd formula and is not a standard operator, so it is taken only
where nothing needs either: fp32 CPU tensors, no gradient wanted, no autocast (autocast's bf16
linear is oneDNN already), no tracing / export / compile; everywhere else `F.linear`.
`PROSCALE_LINEAR=aten` in the environment turns it off.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from proscale.kernels import tracing


@functools.cache
def onednn_available() -> bool:
    return (os.environ.get("PROSCALE_LINEAR", "onednn") != "aten" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `linear` takes oneDNN for this input and weight."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and x.dim() >= 2
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
            and onednn_available() and not tracing())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           relu: bool = False) -> torch.Tensor:
    """(..., in) @ weight (out, in)^T + bias (out,) -> (..., out), then ReLU if `relu`.
    Equal to F.linear up to the summation order (~1e-6 relative)."""
    if use_onednn(x, weight):
        if relu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [None], "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    # In-place: the output is the layer's own temporary, and ReLU's backward needs no input.
    return F.relu(y, inplace=True) if relu else y


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear_relu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ReLU(layer(x)), fused where `layer` is our Linear; any other module (e.g. a dynamically
    quantised linear layer, benchmarks/precision.py) is called as it is."""
    if type(layer) is Linear:
        return linear(x, layer.weight, layer.bias, relu=True)
    return F.relu(layer(x), inplace=True)
