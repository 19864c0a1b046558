"""Frozen batch norms of a convolutional backbone (detectron2's FrozenBN, timm's
freeze_batch_norm_2d): computed in the input's dtype, and folded into the convolution before
them at inference.

A frozen norm is an affine map per channel, y = x * scale + shift. After a convolution it can
be folded into the convolution's weights (w * scale) and bias (shift): one pass over the output
less per norm, two element-wise operations less on the largest maps of the network (R50 has 53
norms; docs/speed.md, "Where the fp32 time went"). Folding happens only where no gradient is
wanted (inference, evaluation); training runs conv and norm as written. Parameters, buffers
and state-dict keys are untouched: the folded weights are a cache, rebuilt when any of them
changes (load_state_dict, .to()).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from proscale.kernels import tracing


class FrozenBatchNorm2dInputDtype(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d with the scale and shift in the input's dtype: in fp32 the
    same arithmetic; under bf16 autocast the conv's bf16 output stays bf16 (the fp32 buffers
    would promote every frozen-norm output to fp32: a slow mixed-dtype pass and a cast back for
    the next conv; docs/speed.md). Skipped (identity) where its conv applies it, see ConvFrozenBN."""

    folded = False  # set by fold_frozen_norms_ when the conv before it applies it at inference

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) scale and shift of y = x * scale + shift, fp32."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and not torch.is_grad_enabled():
            return x
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)


class ConvFrozenBN(nn.Conv2d):
    """nn.Conv2d whose next module is a frozen norm (`self._norm[0]`, a plain reference, not a
    submodule): without gradients it runs as one convolution with the norm folded in."""

    _norm: tuple[FrozenBatchNorm2dInputDtype] = ()
    _cache: tuple = ((), None, None)

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * scale, bias * scale + shift), rebuilt when a parameter or buffer changed."""
        norm = self._norm[0]
        tensors = [self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if self.bias is not None:
            tensors.append(self.bias)
        # No cache while tracing (fake tensors have no storage; the exported graph folds it) or
        # for inference tensors (a model built under torch.inference_mode: no version counter).
        if tracing() or any(t.is_inference() for t in tensors):
            key = None
        else:
            key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if key is None or self._cache[0] != key:
            scale, shift = norm.scale_shift()
            weight = self.weight * scale.to(self.weight.dtype).reshape(-1, 1, 1, 1)
            bias = shift if self.bias is None else self.bias * scale + shift
            self._cache = (key, weight, bias.to(self.weight.dtype))
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        weight, bias = self.folded_weights()
        return self._conv_forward(x, weight, bias)


def frozen_norms_in_input_dtype_(body: nn.Module) -> None:
    """Every torchvision FrozenBatchNorm2d in `body` becomes FrozenBatchNorm2dInputDtype (in place)."""
    for m in body.modules():
        if type(m) is FrozenBatchNorm2d:
            m.__class__ = FrozenBatchNorm2dInputDtype


def fold_frozen_norms_(body: nn.Module) -> int:
    """Pairs each frozen norm with the nn.Conv2d that feeds it and folds it there at inference.

    A pair is what ResNets (timm, torchvision) name so: siblings `conv{k}` / `bn{k}`, or
    consecutive children of an nn.Sequential (the downsample path). The forward is assumed to
    apply the norm right after the conv, as those models do (tests/test_backbone.py checks the
    folded model's outputs against the plain one). Returns the number of norms folded."""
    folded = 0
    for parent in body.modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = [(children[a], children[b]) for a, b in zip(names, names[1:])]
        else:
            pairs = [(children.get("conv" + name[2:]), m) for name, m in children.items() if name.startswith("bn")]
        for conv, norm in pairs:
            if (type(conv) in (nn.Conv2d, ConvFrozenBN) and type(norm) is FrozenBatchNorm2dInputDtype
                    and conv.out_channels == norm.weight.numel()):
                conv.__class__ = ConvFrozenBN
                conv._norm = (norm,)
                norm.folded = True
                folded += 1
    return folded
