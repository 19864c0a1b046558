"""MSDA as one fused gather over all levels and points, in plain PyTorch (the CPU fast path).

Idea. Every sample point reads 4 corner rows of D channels. With the value tensor kept in its
natural (B, S, M, D) layout, row (b, s, m) of `value.view(B*S*M, D)` is contiguous, so the whole
attention is one `embedding_bag`: bag (b, q, m) sums K = 4*L*P rows, each scaled by
attention weight x bilinear weight (`per_sample_weights`). embedding_bag's CPU kernel does the
gather and the multiply-add in one pass; it replaces L grid_sample calls (whose channel-strided
reads are slow on CPU) and the (B*M, D, Nq, L*P) tensor they return and autograd keeps.

Zero padding without masks: each level is copied into a map with a one-pixel zero border, and
coordinates are clamped to [-1, W] (x) and [-1, H] (y). Every corner then lands inside the
padded map, a corner outside the image reads a zero row, and a point further out than one pixel
gets weight only on zero rows: exactly zero padding, for the value and for the gradient.

Per-point quantities are kept "planar", (..., L*P) with L*P innermost, rather than (..., 2) or
(..., 4) innermost: element-wise ops on tiny inner dimensions are several times slower on CPU.

Backward is written by hand so that autograd stores nothing but the three inputs (memory at
batch 8 matters); it recomputes the corner rows and weights and then
  * grad value: the transpose of the forward, again as embedding_bags, over the points sorted
    by their top-left row (bag = table row, entries = grad_out rows), one per corner, shifted
    by the corner's row offset. Much faster on CPU than index_add_ or embedding_bag's own
    weight gradient, needs no (points x D) temporary, and is deterministic.
  * grad attention weights and locations from the 4 corner dot products
    <grad_out[bag], value[corner]>, computed by chunks (gather + bmm).
Work is split over groups of batch elements (and bags) so that temporaries stay bounded.

Coordinates: x = loc_x * W - 0.5 (pixel centres at (i+0.5)/W, align_corners=False), a single
fp32 rounding. grid_sample computes (2*loc - 1 + 1) * W/2 - 0.5 with another rounding, so in
fp32 the two can differ by an ulp of x (~1e-5 relative on bilinear weights at W ~ 100): both
are fp32 roundings of the same number.

Shapes: B batch, Nq queries, S = sum H_l*W_l, M heads, D channels per head, L levels,
P points; a bag is one (b, q, m).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from proscale.kernels.msda_pure import ms_deform_attn_pure
from proscale.kernels.tables import cached, level_starts

# Corner samples handled at once (bounds the per-sample temporaries of one chunk to a few
# hundred MB). 800x1088 with 3 levels has 6.9 M corner samples per image.
MAX_SAMPLES_PER_CHUNK = 1 << 24
# Row indices are computed as floats (one pass, one conversion) while exact: below 2^24 rows in
# fp32, 2^53 in fp64; integer arithmetic beyond.
EXACT_FLOAT_ROWS = {torch.float32: 1 << 24, torch.float64: 1 << 53}
# Bags per gather+dot block in the backward: on CPU small enough for the gathered rows to stay
# in cache (~6 MB at D=32, L*P=12); on a GPU large, to keep the number of launches low.
DOT_BLOCK_BAGS = 1024
DOT_BLOCK_BAGS_CUDA = 1 << 15


class _Plan:
    """Per-size constants on one device, indexed by l*P + p (built once, see tables.cached)."""

    def __init__(self, spatial_shapes, M: int, P: int, device: torch.device, dtype: torch.dtype):
        self.M = M
        wp = [w + 2 for _, w in spatial_shapes]
        hp = [h + 2 for h, _ in spatial_shapes]
        self.padded_starts = level_starts(spatial_shapes, pad=1)
        self.s_pad = sum(a * b for a, b in zip(hp, wp))

        def per_point(values, dt=dtype):
            return torch.tensor(values, dtype=dt, device=device).repeat_interleave(P)

        self.width = per_point([w for _, w in spatial_shapes])  # (L*P,)
        self.height = per_point([h for h, _ in spatial_shapes])
        # Top-left corner (x0, y0) in padded table rows: (start + (y0+1)*Wp + x0+1) * M + m
        # = x0*M + y0*Wp*M + (start + Wp + 1)*M + m.
        self.y_stride = per_point([w * M for w in wp])
        self.y_stride_i64 = per_point([w * M for w in wp], torch.int64)
        self.level_base = per_point([(s + w + 1) * M for s, w in zip(self.padded_starts, wp)])
        self.level_base_i64 = per_point([(s + w + 1) * M for s, w in zip(self.padded_starts, wp)], torch.int64)
        self.head = torch.arange(M, dtype=dtype, device=device).view(M, 1)
        self.head_i64 = torch.arange(M, dtype=torch.int64, device=device).view(M, 1)
        # (4, L*P) row offsets of the corners (dy, dx) = 00, 01, 10, 11 from the top-left one.
        offsets = [[0] * len(wp), [M] * len(wp), [w * M for w in wp], [w * M + M for w in wp]]
        self.corner_offsets = {
            t: torch.tensor(offsets, dtype=t, device=device).repeat_interleave(P, dim=1)
            for t in (torch.int32, torch.int64)
        }
        # Per level: [first row, end row) in the padded (S_pad * M) table, and padded width.
        self.level_rows = [(s * M, (s + a * b) * M, b) for s, a, b in zip(self.padded_starts, hp, wp)]


def _plan(spatial_shapes, M: int, P: int, device: torch.device, dtype: torch.dtype) -> _Plan:
    return cached(("fused_plan", spatial_shapes, M, P, torch.device(device), dtype),
                  lambda: _Plan(spatial_shapes, M, P, device, dtype))


def pad_levels(value: torch.Tensor, spatial_shapes, s_pad: int, starts_pad) -> torch.Tensor:
    """(b, S, M, D) -> (b, S_pad, M, D), each level's map with a one-pixel zero border."""
    b, _, M, D = value.shape
    out = value.new_zeros(b, s_pad, M * D)
    start = 0
    for (h, w), sp in zip(spatial_shapes, starts_pad):
        dst = out[:, sp:sp + (h + 2) * (w + 2)].view(b, h + 2, w + 2, M * D)[:, 1:-1, 1:-1]
        dst.copy_(value[:, start:start + h * w].reshape(b, h, w, M * D))
        start += h * w
    return out.view(b, s_pad, M, D)


def unpad_levels(padded: torch.Tensor, spatial_shapes, starts_pad, out: torch.Tensor) -> None:
    """Inverse of pad_levels (border dropped), written into out (b, S, M, D)."""
    b, _, M, D = padded.shape
    flat = padded.view(b, -1, M * D)
    start = 0
    for (h, w), sp in zip(spatial_shapes, starts_pad):
        src = flat[:, sp:sp + (h + 2) * (w + 2)].view(b, h + 2, w + 2, M * D)[:, 1:-1, 1:-1]
        out[:, start:start + h * w].view(b, h, w, M * D).copy_(src)
        start += h * w


def _axis(coord: torch.Tensor, size: torch.Tensor, with_inside: bool):
    """Pixel coordinate along one axis: clamped top-left index (float), fraction, inside mask."""
    x = coord * size - 0.5
    inside = ((x > -1) & (x < size)) if with_inside else None
    # NaN would become a garbage row index; send it outside (value 0, gradient 0) instead.
    x = x.nan_to_num_(nan=-1.0).clamp_(min=-1.0)
    x = torch.minimum(x, size, out=x)
    x0 = torch.minimum(x.floor(), size - 1)
    return x0, x.sub_(x0), inside


def _points(loc: torch.Tensor, plan: _Plan, index_dtype: torch.dtype, with_inside: bool = False):
    """Top-left corner rows and bilinear fractions of every sample point.

    Args:
        loc: (b, Nq, M, L, P, 2) sampling locations (x, y) in [0, 1], compute dtype.
    Returns:
        row: (b, Nq, M, L*P) top-left corner's row in the padded (b * S_pad * M, D) table; the
            other corners are row + plan.corner_offsets.
        fx, fy: (b, Nq, M, L*P) fractional parts.
        inside: (x_inside, y_inside) bool masks where the coordinate clamp is the identity
            (outside it the sampled value is constant 0, and so is its gradient), or None.
    """
    b, Nq, M = loc.shape[:3]
    pts = loc.view(b, Nq, M, -1, 2)
    x0, fx, x_in = _axis(pts[..., 0], plan.width, with_inside)
    y0, fy, y_in = _axis(pts[..., 1], plan.height, with_inside)
    batch_stride = plan.s_pad * M
    if b * batch_stride < EXACT_FLOAT_ROWS.get(loc.dtype, 0):
        # Integer-valued floats are exact here: one pass of float ops, one conversion.
        batch = torch.arange(b, device=loc.device, dtype=loc.dtype).view(b, 1, 1, 1) * batch_stride
        row = x0.mul_(M).add_(y0.mul_(plan.y_stride)).add_(plan.level_base).add_(plan.head).add_(batch)
        row = row.to(index_dtype)
    else:
        batch = torch.arange(b, device=loc.device, dtype=torch.int64).view(b, 1, 1, 1) * batch_stride
        row = x0.to(torch.int64) * M + y0.to(torch.int64) * plan.y_stride_i64 + plan.level_base_i64
        row = (row + plan.head_i64 + batch).to(index_dtype)
    return row, fx, fy, ((x_in, y_in) if with_inside else None)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation for half inputs; fp64 stays fp64 (gradcheck)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _chunks(n: int, per_item: int, budget: int):
    step = max(1, budget // max(per_item, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class FusedMSDA(torch.autograd.Function):
    """Autograd wrapper; saves only (value, sampling_locations, attention_weights)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights):
        B, S, M, D = value.shape
        _, Nq, _, L, P, _ = sampling_locations.shape
        cd = _compute_dtype(value, sampling_locations, attention_weights)
        plan = _plan(spatial_shapes, M, P, value.device, cd)
        out = value.new_empty(B, Nq, M, D, dtype=cd)
        for b0, b1 in _chunks(B, Nq * M * L * P * 4, MAX_SAMPLES_PER_CHUNK):
            nb = b1 - b0
            rows = nb * plan.s_pad * M
            index_dtype = torch.int32 if rows < 2**31 else torch.int64
            vpad = pad_levels(value[b0:b1].to(cd), spatial_shapes, plan.s_pad, plan.padded_starts)
            row, fx, fy, _ = _points(sampling_locations[b0:b1].to(cd), plan, index_dtype)
            a = attention_weights[b0:b1].to(cd).view(fx.shape)
            ay1 = fy * a  # a * fy and a * (1 - fy): attention folded into the y weights
            ay0 = a - ay1
            ofx = 1 - fx
            # (nb, Nq, M, 4, L*P): corners (dy, dx) = 00, 01, 10, 11; order within a bag is free.
            w = torch.stack((ay0 * ofx, ay0 * fx, ay1 * ofx, ay1 * fx), dim=-2)
            idx = row.unsqueeze(-2) + plan.corner_offsets[index_dtype]
            bags = nb * Nq * M
            out[b0:b1] = F.embedding_bag(idx.view(bags, -1), vpad.view(rows, D), per_sample_weights=w.view(bags, -1),
                                         mode="sum").view(nb, Nq, M, D)
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.spatial_shapes = spatial_shapes
        return out.view(B, Nq, M * D).to(value.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn = ctx.saved_tensors
        spatial_shapes = ctx.spatial_shapes
        need_v, _, need_loc, need_attn = ctx.needs_input_grad
        B, S, M, D = value.shape
        _, Nq, _, L, P, _ = loc.shape
        cd = _compute_dtype(value, loc, attn)
        plan = _plan(spatial_shapes, M, P, value.device, cd)
        g = grad_out.to(cd).reshape(B, Nq * M, D)
        grad_v = torch.empty(B, S, M, D, dtype=cd, device=value.device) if need_v else None
        grad_loc = torch.empty(loc.shape, dtype=cd, device=loc.device) if need_loc else None
        grad_attn = torch.empty(attn.shape, dtype=cd, device=attn.device) if need_attn else None
        for b0, b1 in _chunks(B, Nq * M * L * P * 4, MAX_SAMPLES_PER_CHUNK):
            nb = b1 - b0
            rows = nb * plan.s_pad * M
            index_dtype = torch.int32 if rows < 2**31 else torch.int64
            row, fx, fy, inside = _points(loc[b0:b1].to(cd), plan, index_dtype, with_inside=need_loc)
            a = attn[b0:b1].to(cd).view(fx.shape)
            ofx, ofy = 1 - fx, 1 - fy
            gb = g[b0:b1].reshape(-1, D)  # (bags, D), bag = (b, q, m)
            if need_v:
                table = _grad_table(row.view(-1), fx.view(-1), (a * ofy).view(-1), (a * fy).view(-1), gb, plan, nb)
                unpad_levels(table.view(nb, plan.s_pad, M, D), spatial_shapes, plan.padded_starts, grad_v[b0:b1])
            if need_loc or need_attn:
                vpad = pad_levels(value[b0:b1].to(cd), spatial_shapes, plan.s_pad, plan.padded_starts).view(rows, D)
                d00, d01, d10, d11 = _corner_dots(row, plan.corner_offsets[index_dtype], vpad, gb).unbind(-2)
                if need_attn:
                    grad_attn[b0:b1] = (ofy * (ofx * d00 + fx * d01) + fy * (ofx * d10 + fx * d11)).view(
                        grad_attn[b0:b1].shape)
                if need_loc:
                    # d sample/d fx = (1-fy)(v01 - v00) + fy (v11 - v10), and x = loc_x * W - 0.5.
                    gx = (ofy * (d01 - d00) + fy * (d11 - d10)).mul_(a).mul_(plan.width).mul_(inside[0])
                    gy = (ofx * (d10 - d00) + fx * (d11 - d01)).mul_(a).mul_(plan.height).mul_(inside[1])
                    grad_loc[b0:b1] = torch.stack((gx, gy), -1).view(grad_loc[b0:b1].shape)
        return (
            grad_v.to(value.dtype) if need_v else None,
            None,
            grad_loc.to(loc.dtype) if need_loc else None,
            grad_attn.to(attn.dtype) if need_attn else None,
        )


def _corner_dots(row: torch.Tensor, offsets: torch.Tensor, vpad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """<g[bag], value[corner]> for the 4 corners of every point.

    row: (b, Nq, M, L*P) top-left rows; offsets: (4, L*P); vpad: (rows, D); g: (bags, D).
    Returns (b, Nq, M, 4, L*P). Done by blocks of bags so that the gathered rows never exist
    all at once. The gather is an embedding_bag with bags of one row: on CPU about twice as
    fast as index_select; the dot is an in-place multiply and a sum (faster than a tiny bmm).
    """
    bags, D = g.shape
    rows = row.view(bags, 1, -1)
    K = offsets.numel()
    out = torch.empty(bags, K, dtype=g.dtype, device=g.device)
    block = DOT_BLOCK_BAGS_CUDA if g.is_cuda else DOT_BLOCK_BAGS
    for s in range(0, bags, block):
        e = min(bags, s + block)
        idx = (rows[s:e] + offsets).view(-1, 1)
        gathered = F.embedding_bag(idx, vpad, mode="sum").view(e - s, K, D)
        torch.sum(gathered.mul_(g[s:e].unsqueeze(1)), -1, out=out[s:e])
    return out.view(*row.shape[:-1], 4, -1)


def _grad_table(row: torch.Tensor, fx: torch.Tensor, ay0: torch.Tensor, ay1: torch.Tensor, g: torch.Tensor,
                plan: _Plan, nb: int) -> torch.Tensor:
    """grad of the padded value table: row r gets the sum over corners landing on r of w * g[bag].

    row: (n_pts,) top-left rows, points ordered (bag, l*P+p); fx: (n_pts,) x fractions;
    ay0, ay1: (n_pts,) attention x (1 - fy) and attention x fy; g: (bags, D).
    Returns (nb * S_pad * M, D).

    The points are sorted by top-left row, so each table row is one bag of an embedding_bag over
    the rows of g: no atomics, no (points x D) temporary, deterministic. One such sum per corner
    (dy, dx), then shifted by that corner's row offset (dy*Wp + dx)*M within its level (a
    top-left row plus an offset never leaves its level's padded map).
    """
    bags, D = g.shape
    n_rows = nb * plan.s_pad * plan.M
    sorted_rows, order = torch.sort(row, stable=True)
    # Bag boundaries without a host sync (bincount would read the max back).
    bounds = torch.arange(n_rows + 1, device=row.device, dtype=sorted_rows.dtype)
    offsets = torch.searchsorted(sorted_rows, bounds)
    src = torch.div(order, row.numel() // bags, rounding_mode="floor")
    fx, ay0, ay1 = (t.index_select(0, order) for t in (fx, ay0, ay1))
    ofx = 1 - fx
    table = None
    for dy, ay in ((0, ay0), (1, ay1)):
        for dx, wx in ((0, ofx), (1, fx)):
            part = F.embedding_bag(src, g, offsets, mode="sum", per_sample_weights=ay * wx, include_last_offset=True)
            if table is None:
                table = part
                continue
            t3, p3 = table.view(nb, -1, D), part.view(nb, -1, D)
            for lo, hi, wp in plan.level_rows:
                shift = (dy * wp + dx) * plan.M
                t3[:, lo + shift:hi].add_(p3[:, lo:hi - shift])
    return table


def ms_deform_attn_fused(value, spatial_shapes, sampling_locations, attention_weights):
    """Same contract as msda_pure.ms_deform_attn_pure:
    value (B, S, M, D), sampling_locations (B, Nq, M, L, P, 2), attention_weights (B, Nq, M, L, P)
    -> (B, Nq, M*D) in value's dtype (accumulated in fp32 or better)."""
    if sampling_locations.numel() == 0 or value.numel() == 0:  # empty: nothing to speed up
        return ms_deform_attn_pure(value, spatial_shapes, sampling_locations, attention_weights)
    return FusedMSDA.apply(value, spatial_shapes, sampling_locations.contiguous(), attention_weights.contiguous())
