"""Cross-check of `flops.count_flops` with fvcore's own tracer (FlopCountAnalysis).

fvcore traces a real forward with torch.jit (slow at full size on a CPU), so this is for tests
and for the comparison table in docs/flops.md, not for everyday counting.
"""
from __future__ import annotations

import copy

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from proscale.analysis.flop_counter import sdpa_flops
from proscale.analysis.flops import padded_size
from proscale.models.ms_deform_attn import use_msda_backend


def _fvcore_sdpa(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention (fvcore 0.1.5 has none)."""
    return sdpa_flops(*(get_shape(t) for t in inputs[:3]))


class _AllPredictions(nn.Module):
    """Returns every prediction of a MaskFormer as a tuple: the JIT graph drops whatever does
    not reach an output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        aux = [t for a in out["aux_outputs"] for t in (a["pred_logits"], a["pred_masks"])]
        return tuple([out["pred_logits"], out["pred_masks"]] + aux)


def fvcore_count(model: nn.Module, size: tuple[int, int], batch: int = 1) -> dict[str, int]:
    """FLOPs of backbone / pixel_decoder (and its encoder) / transformer_decoder / total from
    fvcore.nn.FlopCountAnalysis (JIT trace of a real forward on a copy, MSDA in the
    grid_sample form, a handle added for scaled_dot_product_attention).

    Backbone and pixel decoder agree exactly with count_flops. In the transformer decoder fvcore
    comes out a little lower (7e-5 at 800x1088) for two reasons of its own: the JIT graph drops
    the resize of the last prediction's attention mask (computed, but no output uses it), and
    its einsum handle parses numpy's printed path, rounded to 4 significant digits."""
    work = copy.deepcopy(model).eval()
    param = next(work.parameters())
    images = torch.zeros(batch, 3, *padded_size(model, size), device=param.device)
    with torch.no_grad(), use_msda_backend(work, "pure"):
        analysis = FlopCountAnalysis(_AllPredictions(work), (images,))
        analysis.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_module = analysis.by_module()
    return {
        "backbone": by_module["model.backbone"],
        "pixel_decoder": by_module["model.pixel_decoder"],
        "pixel_decoder.encoder": sum(by_module[f"model.pixel_decoder.encoder.layers.{i}"]
                                     for i in range(len(work.pixel_decoder.encoder.layers))),
        "transformer_decoder": by_module["model.transformer_decoder"],
        "total": analysis.total(),
    }
