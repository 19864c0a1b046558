"""MSDA forward and backward as Triton kernels (CUDA; also runs under TRITON_INTERPRET=1 on CPU).

One program per (query block, head, batch element). It walks the L levels and P points of its
queries (unrolled: L and P are compile-time constants) and handles the D channels of one head
as the second axis of a (BLOCK_Q, BLOCK_D) tile, so each corner read is one contiguous D-row
per query (value layout (B, S, M, D): row (b, s, m) is contiguous). Accumulation is fp32 for
fp32/fp16/bf16 inputs.

Backward recomputes the corners, and per sample point:
  * dot_c = <grad_out, value[corner c]> for the 4 corners,
  * grad attention weight = sum_c bilinear_c * dot_c,
  * grad location from the derivative of the bilinear weights (times W_l or H_l),
  * grad value[corner c] += attention * bilinear_c * grad_out, with atomic adds into an fp32
    buffer (several queries read the same pixel).

Level shapes and starts come from a small int32 device table (H_l, W_l, start_l) built once per
input size (tables.shape_table): no host sync, and no recompilation when the image size changes.

Shapes: value (B, S, M, D); sampling_locations (B, Nq, M, L, P, 2) as (x, y) in [0, 1];
attention_weights (B, Nq, M, L, P); output (B, Nq, M*D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from proscale.kernels.tables import shape_table

# Launch settings; benchmarks/gpu.py sweeps them on an H100 (keys: block_q, num_warps).
FORWARD_CONFIG = {"block_q": 64, "num_warps": 4}
BACKWARD_CONFIG = {"block_q": 32, "num_warps": 4}


@triton.jit
def _level(shapes_ptr, l):
    """Level l's height, width and first token from the (L, 3) shape table; width and height in fp32."""
    h = tl.load(shapes_ptr + 3 * l)
    w = tl.load(shapes_ptr + 3 * l + 1)
    start = tl.load(shapes_ptr + 3 * l + 2)
    wf = w.to(tl.float32)
    hf = h.to(tl.float32)
    return h, w, start, wf, hf


@triton.jit
def _corner_setup(loc_base, attn_base, k, qmask, wf, hf):
    """Pixel coordinates of point k: (x0, y0) int32 top-left corner, fractions, attention weight."""
    lx = tl.load(loc_base + 2 * k, mask=qmask, other=0.0).to(tl.float32)
    ly = tl.load(loc_base + 2 * k + 1, mask=qmask, other=0.0).to(tl.float32)
    a = tl.load(attn_base + k, mask=qmask, other=0.0).to(tl.float32)
    # Pixel centres at (i + 0.5) / W (align_corners=False).
    x = lx * wf - 0.5
    y = ly * hf - 0.5
    # Keep the int conversion in range (far-away points and NaN read nothing either way).
    x = tl.where(x == x, x, -2.0)
    y = tl.where(y == y, y, -2.0)
    x = tl.minimum(tl.maximum(x, -2.0), wf + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), hf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f, a


@triton.jit
def _tile_mask(valid, dmask, EVEN_D: tl.constexpr):
    """(BLOCK_Q, BLOCK_D) mask. When BLOCK_D == D the channel mask is left out: a mask that is
    constant along the channels lets the compiler use vector loads (4 x fp32 per thread)."""
    if EVEN_D:
        return valid[:, None]
    else:
        return valid[:, None] & dmask[None, :]


@triton.jit
def _corner_ptrs(base, xi, yi, w, h, start, qmask, dmask, ROW: tl.constexpr, EVEN_D: tl.constexpr):
    """(BLOCK_Q, BLOCK_D) pointers from `base` (value or its gradient) to the rows of corner
    (xi, yi), and their mask (row 0, masked off, where the corner lies outside the map)."""
    valid = qmask & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    row = tl.where(valid, start + yi * w + xi, 0)
    ptrs = base + row[:, None] * ROW
    return ptrs, _tile_mask(valid, dmask, EVEN_D)


@triton.jit
def _msda_fwd_kernel(
    value_ptr, loc_ptr, attn_ptr, shapes_ptr, out_ptr,
    Nq, S,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    b = tl.program_id(2)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Nq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    bag = (b * Nq + q).to(tl.int64) * M + m  # (b, q, m) index
    loc_base = loc_ptr + bag * (L * P * 2)
    attn_base = attn_ptr + bag * (L * P)
    v_base = value_ptr + b.to(tl.int64) * S * M * D + m * D + d[None, :]
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    # Plain loops, not unrolled: unrolling all 4*L*P corner loads made the compiler hoist them
    # (255 registers and spills for the forward); the loop keeps 4 tiles live at a time.
    for l in range(L):
        h, w, start, wf, hf = _level(shapes_ptr, l)
        for p in range(P):
            x0, y0, fx, fy, a = _corner_setup(loc_base, attn_base, l * P + p, qmask, wf, hf)
            ptrs, msk = _corner_ptrs(v_base, x0, y0, w, h, start, qmask, dmask, M * D, EVEN_D)
            acc += (a * (1.0 - fx) * (1.0 - fy))[:, None] * tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
            ptrs, msk = _corner_ptrs(v_base, x0 + 1, y0, w, h, start, qmask, dmask, M * D, EVEN_D)
            acc += (a * fx * (1.0 - fy))[:, None] * tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
            ptrs, msk = _corner_ptrs(v_base, x0, y0 + 1, w, h, start, qmask, dmask, M * D, EVEN_D)
            acc += (a * (1.0 - fx) * fy)[:, None] * tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
            ptrs, msk = _corner_ptrs(v_base, x0 + 1, y0 + 1, w, h, start, qmask, dmask, M * D, EVEN_D)
            acc += (a * fx * fy)[:, None] * tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + bag[:, None] * D + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=_tile_mask(qmask, dmask, EVEN_D))


@triton.jit
def _corner_backward(v_base, gv_base, xi, yi, w, h, start, qmask, dmask, g, scale, ROW: tl.constexpr,
                     EVEN_D: tl.constexpr):
    """<grad_out, value[corner]> per query; grad_value[corner] += scale * grad_out (atomic)."""
    ptrs, msk = _corner_ptrs(v_base, xi, yi, w, h, start, qmask, dmask, ROW, EVEN_D)
    v = tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    # The same rows of the gradient (the compiler computes the index once).
    grad_ptrs, _ = _corner_ptrs(gv_base, xi, yi, w, h, start, qmask, dmask, ROW, EVEN_D)
    tl.atomic_add(grad_ptrs, scale[:, None] * g, mask=msk, sem="relaxed")
    return tl.sum(v * g, axis=1)


@triton.jit
def _msda_bwd_kernel(
    value_ptr, loc_ptr, attn_ptr, shapes_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    Nq, S,
    M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    m = tl.program_id(1)
    b = tl.program_id(2)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Nq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    bag = (b * Nq + q).to(tl.int64) * M + m
    loc_base = loc_ptr + bag * (L * P * 2)
    attn_base = attn_ptr + bag * (L * P)
    batch_offset = b.to(tl.int64) * S * M * D + m * D + d[None, :]
    v_base = value_ptr + batch_offset
    gv_base = grad_value_ptr + batch_offset  # fp32 buffer, same layout as value
    g = tl.load(grad_out_ptr + bag[:, None] * D + d[None, :], mask=_tile_mask(qmask, dmask, EVEN_D),
                other=0.0).to(tl.float32)
    for l in range(L):
        h, w, start, wf, hf = _level(shapes_ptr, l)
        for p in range(P):
            k = l * P + p
            x0, y0, fx, fy, a = _corner_setup(loc_base, attn_base, k, qmask, wf, hf)
            gx0 = 1.0 - fx
            gy0 = 1.0 - fy
            d00 = _corner_backward(v_base, gv_base, x0, y0, w, h, start, qmask, dmask, g, a * gx0 * gy0,
                                   M * D, EVEN_D)
            d01 = _corner_backward(v_base, gv_base, x0 + 1, y0, w, h, start, qmask, dmask, g, a * fx * gy0,
                                   M * D, EVEN_D)
            d10 = _corner_backward(v_base, gv_base, x0, y0 + 1, w, h, start, qmask, dmask, g, a * gx0 * fy,
                                   M * D, EVEN_D)
            d11 = _corner_backward(v_base, gv_base, x0 + 1, y0 + 1, w, h, start, qmask, dmask, g, a * fx * fy,
                                   M * D, EVEN_D)
            g_attn = gx0 * gy0 * d00 + fx * gy0 * d01 + gx0 * fy * d10 + fx * fy * d11
            # d sample / d x = (1-fy)(v01 - v00) + fy (v11 - v10), and x = loc_x * W - 0.5.
            g_x = a * (gy0 * (d01 - d00) + fy * (d11 - d10)) * wf
            g_y = a * (gx0 * (d10 - d00) + fx * (d11 - d01)) * hf
            tl.store(grad_attn_ptr + bag * (L * P) + k, g_attn.to(grad_attn_ptr.dtype.element_ty), mask=qmask)
            tl.store(grad_loc_ptr + bag * (L * P * 2) + 2 * k, g_x.to(grad_loc_ptr.dtype.element_ty), mask=qmask)
            tl.store(grad_loc_ptr + bag * (L * P * 2) + 2 * k + 1, g_y.to(grad_loc_ptr.dtype.element_ty),
                     mask=qmask)


def _check(value, spatial_shapes, loc, attn):
    B, S, M, D = value.shape
    if loc.shape[:3] != (B, loc.shape[1], M) or loc.shape[3] != len(spatial_shapes) or loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations {tuple(loc.shape)} does not fit value {tuple(value.shape)}")
    if attn.shape != loc.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attn.shape)} != sampling_locations[:-1] {tuple(loc.shape[:-1])}")
    if S * M * D >= 2**31:
        raise ValueError("one batch element's value tensor exceeds 2^31 elements (int32 offsets)")


class TritonMSDA(torch.autograd.Function):
    """Autograd wrapper around the two kernels; saves only the three inputs."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights):
        value = value.contiguous()
        loc = sampling_locations.contiguous()
        attn = attention_weights.contiguous()
        _check(value, spatial_shapes, loc, attn)
        B, S, M, D = value.shape
        Nq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        table = shape_table(spatial_shapes, value.device)
        out = value.new_empty(B, Nq, M * D)
        if out.numel():
            cfg = FORWARD_CONFIG
            grid = (triton.cdiv(Nq, cfg["block_q"]), M, B)
            _msda_fwd_kernel[grid](
                value, loc, attn, table, out, Nq, S,
                M=M, D=D, L=L, P=P, BLOCK_Q=cfg["block_q"], BLOCK_D=triton.next_power_of_2(D),
                EVEN_D=triton.next_power_of_2(D) == D, num_warps=cfg["num_warps"],
            )
        ctx.save_for_backward(value, loc, attn, table)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        value, loc, attn, table = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, S, M, D = value.shape
        Nq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_loc = torch.empty_like(loc)
        grad_attn = torch.empty_like(attn)
        if grad_out.numel():
            cfg = BACKWARD_CONFIG
            grid = (triton.cdiv(Nq, cfg["block_q"]), M, B)
            _msda_bwd_kernel[grid](
                value, loc, attn, table, grad_out, grad_value, grad_loc, grad_attn, Nq, S,
                M=M, D=D, L=L, P=P, BLOCK_Q=cfg["block_q"], BLOCK_D=triton.next_power_of_2(D),
                EVEN_D=triton.next_power_of_2(D) == D, num_warps=cfg["num_warps"],
            )
        else:
            grad_loc.zero_()
            grad_attn.zero_()
        need_v, _, need_loc, need_attn = ctx.needs_input_grad
        return (
            grad_value.to(value.dtype) if need_v else None,
            None,
            grad_loc if need_loc else None,
            grad_attn if need_attn else None,
        )


def ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights):
    """Same contract as msda_pure.ms_deform_attn_pure; output in value's dtype."""
    return TritonMSDA.apply(value, spatial_shapes, sampling_locations, attention_weights)
