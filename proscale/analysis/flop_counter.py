"""FLOPs per ATen operator in fvcore's convention, and the dispatch mode that applies them.

Convention (fvcore's, the one papers quote; docs/flops.md tabulates it):
  * one multiply-add = 1 FLOP; biases are not counted;
  * Linear / matmul / bmm / einsum / conv: the multiply-adds of the product;
  * scaled-dot-product attention (fused or not): the two products Q K^T and A V
    (fvcore 0.1.5 has no handle for the fused op; its math form is two bmm);
  * GroupNorm / LayerNorm: 5 per element (4 without affine); BatchNorm in eval: 2 per element
    (1 without affine), in training 5 (4). FrozenBN (the R50 presets, timm's
    FrozenBatchNorm2d) is an element-wise scale-and-shift: 0, as fvcore counts it;
  * bilinear upsampling: 4 per output element (nearest 1); adaptive average pooling: 1 per
    input element;
  * bilinear sampling (grid_sample): 4 per sampled value (one multiply-add per corner; nearest
    1, bicubic 16). In MSDA that is 8 heads x L levels x 4 points x 32 channels x 4 corners =
    4,096 * L per query;
  * counted as 0 (fvcore ignores them or has no handle): element-wise arithmetic and
    activations (add, mul, div, relu, gelu, sigmoid, ...), softmax, reductions (sum, mean,
    all ...), max pooling (LPE), comparisons, and all copies, views, indexing and tensor
    creation (`ZERO_OPS`). In MSDA these are the softmax of the attention weights, the
    location arithmetic (reference point + offset * (1/W, 1/H), 2*loc - 1) and the
    attention-weighted sum of the sampled values (a mul and a sum).
Any other operator is an "unsupported" hole: it counts 0 and is listed in
`FlopCounter.unsupported`, so a hole is never silent.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections import Counter, defaultdict

import torch
from torch import nn

from torch.utils._python_dispatch import TorchDispatchMode


def encoder_layer_flops_per_token(d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                                  ffn_dim: int = 1024) -> int:
    """Analytic FLOPs of one encoder layer per token (query), in this convention.

    linear: value_proj + output_proj 2 d^2, FFN 2 d F, sampling_offsets d*M*L*P*2 and
    attention_weights d*M*L*P; two LayerNorms 2 * 5 d; bilinear sampling M*L*P*(d/M)*4.
    For d=256, M=8, P=4, F=1024: 657,920 + 28,672 * L (docs/flops.md).
    """
    d, L, M, P, Fd = d_model, n_levels, n_heads, n_points, ffn_dim
    linear = 2 * d * d + 2 * d * Fd + d * M * L * P * 3
    norms = 2 * 5 * d
    sampling = M * L * P * (d // M) * 4
    return linear + norms + sampling


def numel(shape) -> int:
    """Number of elements of a shape (any sequence of ints or SymInts)."""
    return math.prod(int(s) for s in shape)


def sdpa_flops(q_shape, k_shape, v_shape) -> int:
    """Scaled-dot-product attention, Q K^T and A V: q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev)."""
    return numel(q_shape[:-1]) * int(k_shape[-2]) * (int(q_shape[-1]) + int(v_shape[-1]))


# Each formula takes the operator's (args, kwargs, out) and returns its FLOPs.

def _product(args, kwargs, out):  # mm (m, k) @ (k, n), bmm (b, m, k) @ (b, k, n)
    a, b = args[0], args[1]
    return numel(a.shape) * int(b.shape[-1])


def _biased_product(args, kwargs, out):  # addmm / baddbmm: bias + product, the bias add not counted
    return _product(args[1:], kwargs, out)


def _matmul(args, kwargs, out):  # general broadcasting matmul: output elements x inner dim
    a = args[0]
    return numel(out.shape) * int(a.shape[-1])


def _linear(args, kwargs, out):
    x, w = args[0], args[1]
    return numel(x.shape) * int(w.shape[0])


def _conv(args, kwargs, out):
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    spatial = (x.shape if transposed else out.shape)[2:]
    return int(x.shape[0]) * numel(w.shape) * numel(spatial)


def _norm_affine(weight_index: int):
    def count(args, kwargs, out):
        x = args[0]
        weight = args[weight_index] if len(args) > weight_index else None
        return numel(x.shape) * (5 if weight is not None else 4)
    return count


def _batch_norm(training_index: int | None, training: bool | None = None):
    """Eval: 2 per element (1 without affine); training: as the other norms, 5 (4)."""
    def count(args, kwargs, out):
        x, weight = args[0], args[1] if len(args) > 1 else None
        is_training = training if training is not None else bool(args[training_index])
        if is_training:
            return numel(x.shape) * (5 if weight is not None else 4)
        return numel(x.shape) * (2 if weight is not None else 1)
    return count


def _output_scaled(scale: int):
    def count(args, kwargs, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        return numel(first.shape) * scale
    return count


def _input_scaled(scale: int):
    def count(args, kwargs, out):
        return numel(args[0].shape) * scale
    return count


_GRID_SAMPLE_CORNERS = {0: 4, 1: 1, 2: 16}  # bilinear, nearest, bicubic


def _grid_sample(args, kwargs, out):
    # grid_sampler_2d(input, grid, interpolation_mode, padding_mode, align_corners)
    mode = int(args[2]) if len(args) > 2 else 0
    return numel(out.shape) * _GRID_SAMPLE_CORNERS.get(mode, 4)


def _sdpa(args, kwargs, out):
    return sdpa_flops(args[0].shape, args[1].shape, args[2].shape)


# Keyed by the operator's overload packet name (aten.addmm.default -> "addmm").
FLOP_HANDLES = {
    "mm": _product,
    "addmm": _biased_product,
    "bmm": _product,
    "baddbmm": _biased_product,
    "matmul": _matmul,
    "linear": _linear,
    "_linear_pointwise": _linear,  # mkldnn's linear (+ fused ReLU): proscale/kernels/linear.py
    "convolution": _conv,
    "_convolution": _conv,
    "native_layer_norm": _norm_affine(2),
    "native_group_norm": _norm_affine(1),
    "native_batch_norm": _batch_norm(5),
    "_native_batch_norm_legit": _batch_norm(5),
    "_native_batch_norm_legit_no_training": _batch_norm(None, training=False),
    "_batch_norm_with_update": _batch_norm(None, training=True),
    "_batch_norm_no_update": _batch_norm(None, training=False),
    "upsample_bilinear2d": _output_scaled(4),
    "upsample_nearest2d": _output_scaled(1),
    "_upsample_nearest_exact2d": _output_scaled(1),
    "_adaptive_avg_pool2d": _input_scaled(1),
    "adaptive_avg_pool2d": _input_scaled(1),
    "grid_sampler_2d": _grid_sample,
    "scaled_dot_product_attention": _sdpa,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_flash_attention": _sdpa,
    "_scaled_dot_product_efficient_attention": _sdpa,
    "_scaled_dot_product_cudnn_attention": _sdpa,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa,
}

# Counted as 0, as fvcore does (it ignores them or has no handle). In-place variants
# ("relu_") match their base name.
ZERO_OPS = frozenset("""
add sub rsub mul div neg reciprocal pow sqrt rsqrt exp log log2 sin cos tanh sigmoid relu gelu silu
hardswish hardsigmoid hardtanh leaky_relu elu softplus mish _softmax _safe_softmax _log_softmax softmax
log_softmax clamp clamp_min clamp_max minimum maximum where masked_fill nan_to_num floor ceil round trunc
abs sign erf fmod remainder floor_divide lerp addcmul addcdiv
lt le gt ge eq ne logical_and logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_not
bitwise_xor isnan isinf isfinite
all any sum mean amax amin max min argmax argmin prod cumsum var var_mean std std_mean topk sort
max_pool2d max_pool2d_with_indices avg_pool2d native_dropout dropout
view _unsafe_view reshape _reshape_alias alias t transpose permute expand expand_as squeeze unsqueeze
flatten unflatten select slice narrow split split_with_sizes unbind chunk cat stack clone contiguous
copy _copy_from _to_copy to detach lift_fresh lift_fresh_copy as_strided
zeros zeros_like ones ones_like empty empty_like empty_strided new_empty new_zeros new_ones new_full
full full_like fill scalar_tensor arange linspace meshgrid repeat roll flip index index_select gather
scatter scatter_add index_put index_add constant_pad_nd pad reflection_pad2d replication_pad2d
embedding promote_types _local_scalar_dense nonzero masked_select select_scatter slice_scatter diagonal
tril triu rand randn normal uniform bernoulli randint randperm resize set
""".split())


def _op_name(func) -> str:
    """aten.addmm.default -> "addmm"; in-place aten.relu_.default -> "relu"."""
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.startswith("__") else name


class FlopCounter(TorchDispatchMode):
    """Applies FLOP_HANDLES to every ATen call run under it and books it to the current scope.

    `scope` is a stack of labels: whoever drives the counter (e.g. forward hooks) pushes a label
    on entering a part of the model and pops it on leaving; calls outside every label go to
    `root`.
    """

    def __init__(self, root: str):
        super().__init__()
        self.scope: list[str] = [root]
        self.flops: Counter = Counter()  # scope -> FLOPs
        self.by_op: dict[str, Counter] = defaultdict(Counter)  # scope -> op -> FLOPs
        self.zero_ops: dict[str, Counter] = defaultdict(Counter)  # scope -> op -> calls counted 0
        self.unsupported: dict[str, Counter] = defaultdict(Counter)  # scope -> op -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name == "grid_sampler_2d" and args[0].device.type == "meta":
            # The meta form of grid_sample is a slow Python decomposition: only its shape matters.
            x, grid = args[0], args[1]
            out = x.new_empty((x.shape[0], x.shape[1], grid.shape[1], grid.shape[2]))
        else:
            out = func(*args, **kwargs)
        scope = self.scope[-1]
        handle = FLOP_HANDLES.get(name)
        if handle is not None:
            n = int(handle(args, kwargs, out))
            self.flops[scope] += n
            self.by_op[scope][name] += n
        elif name in ZERO_OPS:
            self.zero_ops[scope][name] += 1
        else:
            self.unsupported[scope][str(func)] += 1
        return out


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data copied): what
    the counters run, so counting allocates nothing and computes nothing."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)
