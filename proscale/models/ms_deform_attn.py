"""Multi-scale deformable attention (MSDeformAttn): the module; its sampling core is in
proscale.kernels.

Shapes used throughout:
    B batch, Nq queries, S value tokens (sum of H_l * W_l over levels), M heads,
    D channels per head, L levels, P sampling points per head and level.

`spatial_shapes` is a tuple of (H_l, W_l) Python ints, never a tensor: that keeps the
forward free of host syncs and friendly to torch.compile / torch.export.

The module computes the sampling locations and attention weights, then calls
`proscale.kernels.ms_deform_attn` with its `backend` attribute: "auto" (the default) runs the
fastest back end for the device (Triton on CUDA, a fused gather on CPU) and the grid_sample
reference while exporting or compiling; "pure", "fused" or "triton" pin one (`use_msda_backend`
does that for every MSDeformAttn of a model, e.g. to count FLOPs on the reference).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from proscale.kernels import AUTO, check_backend, ms_deform_attn
from proscale.kernels.linear import Linear
from proscale.models.constant_cache import ConstantCache

SpatialShapes = tuple[tuple[int, int], ...]


class MSDeformAttn(nn.Module):
    """Deformable attention over L feature levels (Zhu et al., Deformable DETR).

    Each query predicts, per head, P offsets and weights on each of the L levels around its
    reference point, samples the values there bilinearly, and sums them.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                 backend: str = AUTO):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        # MSDA back end of every call: "auto" or one of proscale.kernels.BACKENDS. A plain
        # attribute (not saved in the state dict): it changes the speed, not the result.
        self.backend = check_backend(backend)
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self._offset_scale = ConstantCache()  # (shapes, device, dtype) -> (L, 2) tensor of (1/W, 1/H)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Offsets start on 8 (n_heads) directions, radius growing with the point index.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def offset_scale(self, spatial_shapes: SpatialShapes, like: torch.Tensor) -> torch.Tensor:
        """(L, 2) tensor of (1/W_l, 1/H_l), built once per input size and device."""
        key = (spatial_shapes, like.device, like.dtype)
        return self._offset_scale.get(key, lambda: torch.tensor(
            [[1.0 / w, 1.0 / h] for h, w in spatial_shapes], dtype=like.dtype, device=like.device))

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: SpatialShapes,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Nq, C) queries with position encoding added.
            reference_points: (B or 1, Nq, L, 2) as (x, y) in [0, 1]: offsets are in pixels of
                each level; or (B or 1, Nq, L, 4) boxes (cx, cy, w, h) in [0, 1] (Deformable
                DETR's decoder with box refinement / two-stage): offsets are in units of half
                the box size divided by P.
            value: (B, S, C) tokens of the L levels, concatenated in `spatial_shapes` order.
            spatial_shapes: ((H_l, W_l), ...) of the L levels, Python ints.
            value_padding_mask: optional (B, S) bool, True at tokens on padding: their projected
                values are zeroed, so sampling near the image border does not read padding.
        Returns:
            (B, Nq, C)
        """
        B, Nq, _ = query.shape
        S = value.shape[1]
        L, M, P = self.n_levels, self.n_heads, self.n_points
        if len(spatial_shapes) != L or sum(h * w for h, w in spatial_shapes) != S:
            raise ValueError(f"value has {S} tokens but spatial_shapes {spatial_shapes} describe another layout")
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(B, S, M, self.d_model // M)
        # Locations and the softmax in fp32 at least (autocast gives bf16 / fp16 linear outputs):
        # a bf16 location in [0, 1] is off by up to half a pixel on a 136-wide map.
        offsets = _at_least_fp32(self.sampling_offsets(query)).view(B, Nq, M, L, P, 2)
        weights = _softmax_last(_at_least_fp32(self.attention_weights(query)).view(B, Nq, M, L * P))
        weights = weights.view(B, Nq, M, L, P)
        reference_points = _at_least_fp32(reference_points)
        if reference_points.shape[-1] == 4:
            ref = reference_points[:, :, None, :, None, :]
            locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
        else:
            scale = self.offset_scale(spatial_shapes, offsets)
            locations = torch.addcmul(reference_points[:, :, None, :, None, :], offsets,
                                      scale[None, None, None, :, None, :])  # one pass: ref + offsets * scale
        out = ms_deform_attn(v, spatial_shapes, locations, weights, backend=self.backend)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, backend={self.backend!r}")


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension. Without gradients written out (max, exp, sum, divide, in
    place): torch's softmax kernel over a last dimension of L*P = 12 is ~4.5x slower than these
    four passes (12 vs 2.5 ms for 17,850 tokens x 8 heads on the development CPU; benchmarks/cpu_kernels.py)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.softmax(-1)
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@contextlib.contextmanager
def use_msda_backend(model: nn.Module, backend: str) -> Iterator[int]:
    """Runs every MSDeformAttn inside `model` on `backend` within the block, then restores each
    module's own setting (also on error). Yields how many modules it switched."""
    check_backend(backend)
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.backend for m in modules]
    for m in modules:
        m.backend = backend
    try:
        yield len(modules)
    finally:
        for m, old in zip(modules, saved):
            m.backend = old
