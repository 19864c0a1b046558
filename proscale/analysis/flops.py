"""FLOPs per component, in fvcore's convention: `proscale flops --preset A [--vs B]`.

Convention (fvcore's, the one papers quote; PROSCALE.md section 5):
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
`FlopReport.unsupported` (and in the table), so a hole is never silent.

How it is counted. The model is copied onto the meta device (shapes only, no arithmetic: an
R50 at 800x1088 takes about a second on a CPU) and run once under a TorchDispatchMode that
applies the formulas above to every ATen operator; forward hooks attribute each operator to
the innermost component it runs in. Every MSDeformAttn is counted in the pure grid_sample form
(`reference_msda_forward`, forced on the copy), so the count does not depend on which MSDA back
end (fused gather, Triton) the model would run. `fvcore_count` recounts with fvcore's own JIT
tracer (real tensors, slow at full size); the tests check both agree.

Components (leaves sum to the total):
  backbone
  pixel_decoder.input_proj        1x1 conv + GN of res5, res4, res3
  pixel_decoder.encoder.stage1/2/3  the encoder layers of each stage of the plan
  pixel_decoder.trc               Token Re-Calibration (score linear + the resize of res3)
  pixel_decoder.fpn.lateral       1x1 conv + GN on res2 and the bilinear upsample of res3's output
  pixel_decoder.fpn.output        the stride-4 3x3 conv + GN (Mask2Former) or LPE
  pixel_decoder.mask_features     1x1 conv
  pixel_decoder.other             anything else inside the pixel decoder (0 by design)
  transformer_decoder             masked-attention decoder, heads and mask einsums
  other                           normalisation and padding (0)
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from proscale.kernels.msda_pure import ms_deform_attn_pure

LEAVES = (
    "backbone",
    "pixel_decoder.input_proj",
    "pixel_decoder.encoder.stage1",
    "pixel_decoder.encoder.stage2",
    "pixel_decoder.encoder.stage3",
    "pixel_decoder.trc",
    "pixel_decoder.fpn.lateral",
    "pixel_decoder.fpn.output",
    "pixel_decoder.mask_features",
    "pixel_decoder.other",
    "transformer_decoder",
    "other",
)
# Aggregates: name -> prefix of the leaves it sums.
AGGREGATES = {
    "pixel_decoder": "pixel_decoder.",
    "pixel_decoder.encoder": "pixel_decoder.encoder.",
    "pixel_decoder.fpn": "pixel_decoder.fpn.",
    "total": "",
}
# Table order (aggregates above their parts).
ORDER = (
    "backbone",
    "pixel_decoder",
    "pixel_decoder.input_proj",
    "pixel_decoder.encoder",
    "pixel_decoder.encoder.stage1",
    "pixel_decoder.encoder.stage2",
    "pixel_decoder.encoder.stage3",
    "pixel_decoder.trc",
    "pixel_decoder.fpn",
    "pixel_decoder.fpn.lateral",
    "pixel_decoder.fpn.output",
    "pixel_decoder.mask_features",
    "pixel_decoder.other",
    "transformer_decoder",
    "other",
    "total",
)
LABELS = {
    "backbone": "backbone",
    "pixel_decoder": "pixel decoder",
    "pixel_decoder.input_proj": "  input projections (1x1 conv + GN)",
    "pixel_decoder.encoder": "  encoder layers",
    "pixel_decoder.encoder.stage1": "    stage 1 (res5)",
    "pixel_decoder.encoder.stage2": "    stage 2 (res5+res4)",
    "pixel_decoder.encoder.stage3": "    stage 3 (res5+res4+res3)",
    "pixel_decoder.trc": "  TRC",
    "pixel_decoder.fpn": "  FPN step",
    "pixel_decoder.fpn.lateral": "    lateral 1x1 + upsample",
    "pixel_decoder.fpn.output": "    stride-4 output (3x3 conv or LPE)",
    "pixel_decoder.mask_features": "  mask features (1x1 conv)",
    "pixel_decoder.other": "  other",
    "transformer_decoder": "transformer decoder",
    "other": "other (normalise, pad)",
    "total": "total",
}


def encoder_layer_flops_per_token(d_model: int = 256, n_levels: int = 3, n_heads: int = 8, n_points: int = 4,
                                  ffn_dim: int = 1024) -> int:
    """Analytic FLOPs of one encoder layer per token (query), in this convention.

    linear: value_proj + output_proj 2 d^2, FFN 2 d F, sampling_offsets d*M*L*P*2 and
    attention_weights d*M*L*P; two LayerNorms 2 * 5 d; bilinear sampling M*L*P*(d/M)*4.
    For d=256, M=8, P=4, F=1024: 657,920 + 28,672 * L (PROSCALE.md section 5).
    """
    d, L, M, P, Fd = d_model, n_levels, n_heads, n_points, ffn_dim
    linear = 2 * d * d + 2 * d * Fd + d * M * L * P * 3
    norms = 2 * 5 * d
    sampling = M * L * P * (d // M) * 4
    return linear + norms + sampling


# --------------------------------------------------------------------------------------------
# Per-operator formulas (ATen level, as seen by a TorchDispatchMode)
# --------------------------------------------------------------------------------------------

def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mm(args, kwargs, out):  # (m, k) @ (k, n)
    a, b = args[0], args[1]
    return _numel(a.shape) * int(b.shape[-1])


def _addmm(args, kwargs, out):  # bias + (m, k) @ (k, n): the bias add is not counted
    return _mm(args[1:], kwargs, out)


def _bmm(args, kwargs, out):  # (b, m, k) @ (b, k, n)
    a, b = args[0], args[1]
    return _numel(a.shape) * int(b.shape[-1])


def _baddbmm(args, kwargs, out):
    return _bmm(args[1:], kwargs, out)


def _matmul(args, kwargs, out):  # general broadcasting matmul: output elements x inner dim
    a = args[0]
    return _numel(out.shape) * int(a.shape[-1])


def _linear(args, kwargs, out):
    x, w = args[0], args[1]
    return _numel(x.shape) * int(w.shape[0])


def _conv(args, kwargs, out):
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    spatial = (x.shape if transposed else out.shape)[2:]
    return int(x.shape[0]) * _numel(w.shape) * _numel(spatial)


def _norm_affine(weight_index: int):
    def count(args, kwargs, out):
        x = args[0]
        weight = args[weight_index] if len(args) > weight_index else None
        return _numel(x.shape) * (5 if weight is not None else 4)
    return count


def _batch_norm(training_index: int | None, training: bool | None = None):
    """Eval: 2 per element (1 without affine); training: as the other norms, 5 (4)."""
    def count(args, kwargs, out):
        x, weight = args[0], args[1] if len(args) > 1 else None
        is_training = training if training is not None else bool(args[training_index])
        if is_training:
            return _numel(x.shape) * (5 if weight is not None else 4)
        return _numel(x.shape) * (2 if weight is not None else 1)
    return count


def _output_scaled(scale: int):
    def count(args, kwargs, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        return _numel(first.shape) * scale
    return count


def _input_scaled(scale: int):
    def count(args, kwargs, out):
        return _numel(args[0].shape) * scale
    return count


_GRID_SAMPLE_CORNERS = {0: 4, 1: 1, 2: 16}  # bilinear, nearest, bicubic


def _grid_sample(args, kwargs, out):
    # grid_sampler_2d(input, grid, interpolation_mode, padding_mode, align_corners)
    mode = int(args[2]) if len(args) > 2 else 0
    return _numel(out.shape) * _GRID_SAMPLE_CORNERS.get(mode, 4)


def _sdpa(args, kwargs, out):
    """Q K^T and A V: q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev)."""
    q, k, v = args[0], args[1], args[2]
    return _numel(q.shape[:-1]) * int(k.shape[-2]) * (int(q.shape[-1]) + int(v.shape[-1]))


# Keyed by the operator's overload packet name (aten.addmm.default -> "addmm").
FLOP_HANDLES = {
    "mm": _mm,
    "addmm": _addmm,
    "bmm": _bmm,
    "baddbmm": _baddbmm,
    "matmul": _matmul,
    "linear": _linear,
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


class _Counter(TorchDispatchMode):
    """Applies FLOP_HANDLES to every ATen call and books it to the current scope."""

    def __init__(self):
        super().__init__()
        self.scope: list[str] = ["other"]
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


# --------------------------------------------------------------------------------------------
# MSDA in the reference (grid_sample) form
# --------------------------------------------------------------------------------------------

def reference_msda_forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                           spatial_shapes, *args, **kwargs) -> torch.Tensor:
    """MSDeformAttn.forward in the pure grid_sample form, using the module's own layers.

    query (B, Nq, C), reference_points (B or 1, Nq, L, 2) in [0, 1], value (B, S, C),
    spatial_shapes ((H_l, W_l), ...) -> (B, Nq, C). Extra arguments (if a later version of the
    module takes any) do not change the arithmetic and are ignored.
    """
    B, Nq, C = query.shape
    S = value.shape[1]
    L, M, P = self.n_levels, self.n_heads, self.n_points
    D = self.d_model // M
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    v = self.value_proj(value).view(B, S, M, D)
    offsets = self.sampling_offsets(query).view(B, Nq, M, L, P, 2)
    weights = self.attention_weights(query).view(B, Nq, M, L * P).softmax(-1).view(B, Nq, M, L, P)
    scale = torch.tensor([[1.0 / w, 1.0 / h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
    locations = reference_points[:, :, None, :, None, :] + offsets * scale[None, None, None, :, None, :]
    out = ms_deform_attn_pure(v, shapes, locations, weights)  # the grid_sample form
    return self.output_proj(out)


def _force_reference_msda(model: nn.Module) -> int:
    """Makes every MSDeformAttn of `model` run `reference_msda_forward`; returns how many."""
    from proscale.models.ms_deform_attn import MSDeformAttn

    n = 0
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.forward = reference_msda_forward.__get__(module)
            n += 1
    return n


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data copied)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

@dataclass
class FlopReport:
    """FLOPs of one model at one input size.

    gflops / flops: component -> GFLOPs / exact FLOPs, for the leaves (LEAVES) and the
    aggregates (pixel_decoder, pixel_decoder.encoder, pixel_decoder.fpn, total).
    layers: one entry per encoder layer: stage, levels, tokens (x batch), counted FLOPs and the
    analytic tokens * encoder_layer_flops_per_token(...).
    """

    name: str
    size: tuple[int, int]  # the input size asked for
    padded_size: tuple[int, int]  # what the model runs (padded to its size_divisibility)
    batch: int
    gflops: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)  # plan, trc, output, tokens per level, backbone
    by_operator: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> FLOPs
    zero_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> calls counted 0
    unsupported: dict[str, dict[str, int]] = field(default_factory=dict)  # component -> op -> calls (holes)

    def leaves_sum(self) -> int:
        return sum(self.flops[k] for k in LEAVES)

    def describe(self) -> str:
        info = self.model_info
        parts = [f"{self.name}: input {self.size[0]}x{self.size[1]}"]
        if tuple(self.padded_size) != tuple(self.size):
            parts[0] += f" (padded {self.padded_size[0]}x{self.padded_size[1]})"
        parts.append(f"batch {self.batch}")
        if info:
            parts.append(f"backbone {info.get('backbone')}")
            parts.append(f"plan {tuple(info.get('plan', ()))}")
            parts.append(f"TRC {'on (' + str(info.get('trc_layout')) + ')' if info.get('trc') else 'off'}")
            parts.append(f"output {info.get('output')}")
            tokens = info.get("tokens")
            if tokens:
                parts.append("tokens res5/res4/res3 " + "/".join(f"{t:,}" for t in tokens))
        return ", ".join(parts)

    def table(self, other: "FlopReport | None" = None) -> str:
        return format_table([self] + ([other] if other is not None else []))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _fmt(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def format_table(reports: list[FlopReport]) -> str:
    """Markdown table, GFLOPs per component; with two reports a ratio column (second/first)."""
    largest = max(r.gflops["total"] for r in reports)
    digits = 2 if largest >= 10 else 4
    head = ["component"] + [f"{r.name} GFLOPs" for r in reports]
    if len(reports) == 2:
        head.append(f"{reports[1].name}/{reports[0].name}")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key in ORDER:
        if key == "pixel_decoder.other" and all(r.flops[key] == 0 for r in reports):
            continue
        label = LABELS[key]
        if key == "pixel_decoder.fpn.output" and len(reports) == 1 and reports[0].model_info.get("output"):
            label = "    stride-4 output: " + {"conv": "3x3 conv + GN + ReLU", "lpe": "LPE (max-pool + GN + ReLU)"}.get(
                reports[0].model_info["output"], reports[0].model_info["output"])
        if key.startswith("pixel_decoder.encoder.stage") and len(reports) == 1:
            stage = int(key[-1])
            layers = [lay for lay in reports[0].layers if lay["stage"] == stage]
            if layers:
                label += f": {len(layers)} layer{'s' if len(layers) > 1 else ''} x {layers[0]['tokens']:,} tokens"
            else:
                label += ": 0 layers"
        cells = [label]
        cells += [_fmt(r.gflops[key], digits) for r in reports]
        if len(reports) == 2:
            a, b = reports[0].flops[key], reports[1].flops[key]
            cells.append(f"{b / a:.3f}" if a else ("-" if b == 0 else "n/a"))
        if key == "total":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [r.describe() for r in reports]
    notes.append("fvcore convention: 1 multiply-add = 1 FLOP; MSDA counted in its grid_sample form "
                 "(4 per sampled value); norms 5 per element, FrozenBN/softmax/element-wise ops 0.")
    for r in reports:
        holes = {c: dict(ops) for c, ops in r.unsupported.items() if ops}
        if holes:
            notes.append(f"{r.name}: UNSUPPORTED operators counted as 0: {holes}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _model_info(model: nn.Module, padded: tuple[int, int]) -> dict:
    info: dict = {}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        enc = cfg.encoder
        info.update(backbone=cfg.backbone.name, plan=list(enc.plan), trc=enc.trc,
                    trc_layout=enc.trc_layout if enc.trc else None, output=enc.output, residual=enc.residual)
    else:
        plan = getattr(getattr(getattr(model, "pixel_decoder", None), "encoder", None), "plan", None)
        if plan is not None:
            info["plan"] = list(plan)
    h, w = padded
    info["tokens"] = [math.ceil(h / s) * math.ceil(w / s) for s in (32, 16, 8)]
    return info


def _padded(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    div = int(getattr(model, "size_divisibility", 32) or 1)
    return tuple(-(-int(s) // div) * div for s in size)


def count_flops(model: nn.Module, size: tuple[int, int] = (800, 1088), batch: int = 1, name: str | None = None) -> FlopReport:
    """Counts the FLOPs of one inference forward (eval mode) of a MaskFormer on a (batch, 3, H, W)
    input, H and W padded to the model's size_divisibility.

    The model itself is not run or changed: a meta-device copy is (see the module docstring).
    """
    if not all(hasattr(model, a) for a in ("backbone", "pixel_decoder", "transformer_decoder")):
        raise TypeError("count_flops expects a proscale MaskFormer (backbone, pixel_decoder, transformer_decoder)")
    padded = _padded(model, size)
    meta = _meta_copy(model).eval()
    _force_reference_msda(meta)
    counter = _Counter()
    handles = []
    tokens_seen: dict[int, tuple[int, int]] = {}  # layer index -> (batch, tokens)

    def scope(module: nn.Module, label: str, layer_index: int | None = None):
        def pre(mod, args):
            counter.scope.append(label)
            if layer_index is not None:  # x: (B, N, C)
                tokens_seen[layer_index] = (int(args[0].shape[0]), int(args[0].shape[1]))

        def post(mod, args, output):
            counter.scope.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))

    pd = meta.pixel_decoder
    scope(meta.backbone, "backbone")
    scope(pd, "pixel_decoder.other")
    for proj in pd.input_proj:
        scope(proj, "pixel_decoder.input_proj")
    encoder = pd.encoder
    plan = tuple(getattr(encoder, "plan", ()))
    stages = [s + 1 for s, n in enumerate(plan) for _ in range(n)]
    layer_labels = []
    for i, layer in enumerate(encoder.layers):
        stage = stages[i] if i < len(stages) else layer.self_attn.n_levels
        layer_labels.append(f"pixel_decoder.encoder.stage{stage}#{i}")
        scope(layer, layer_labels[-1], layer_index=i)
    if getattr(encoder, "trc", None) is not None:
        scope(encoder.trc, "pixel_decoder.trc")
    if hasattr(pd, "forward_fpn"):
        # The merge (upsample + add) runs in PixelDecoder.forward_fpn itself: book it to the lateral.
        inner = pd.forward_fpn

        def forward_fpn(*args, **kwargs):
            counter.scope.append("pixel_decoder.fpn.lateral")
            try:
                return inner(*args, **kwargs)
            finally:
                counter.scope.pop()

        pd.forward_fpn = forward_fpn
    scope(pd.adapter_1, "pixel_decoder.fpn.lateral")
    scope(pd.layer_1, "pixel_decoder.fpn.output")
    scope(pd.mask_features, "pixel_decoder.mask_features")
    scope(meta.transformer_decoder, "transformer_decoder")

    images = torch.zeros(batch, 3, *padded, device="meta")
    try:
        with torch.no_grad(), counter:
            meta(images)
    finally:
        for h in handles:
            h.remove()

    def component(label: str) -> str:
        return label.split("#")[0]

    flops = dict.fromkeys(LEAVES, 0)
    for label, n in counter.flops.items():
        key = component(label)
        flops[key if key in flops else "other"] += int(n)
    for agg, prefix in AGGREGATES.items():
        flops[agg] = sum(v for k, v in flops.items() if k in LEAVES and k.startswith(prefix))
    flops = {k: flops[k] for k in ORDER}

    layers = []
    for i, layer in enumerate(encoder.layers):
        if i not in tokens_seen:
            continue
        attn = layer.self_attn
        per_token = encoder_layer_flops_per_token(attn.d_model, attn.n_levels, attn.n_heads, attn.n_points,
                                                  layer.linear1.out_features)
        b, n = tokens_seen[i]
        layers.append({"index": i, "stage": int(layer_labels[i].split("#")[0][-1]), "levels": int(attn.n_levels),
                       "tokens": n, "flops": int(counter.flops.get(layer_labels[i], 0)),
                       "analytic": b * n * per_token})

    def merge(d):
        out: dict[str, Counter] = defaultdict(Counter)
        for label, ops in d.items():
            out[component(label)].update(ops)
        return {k: dict(v) for k, v in out.items() if v}

    return FlopReport(
        name=name or type(model).__name__,
        size=(int(size[0]), int(size[1])),
        padded_size=padded,
        batch=batch,
        gflops={k: v / 1e9 for k, v in flops.items()},
        flops=flops,
        layers=layers,
        model_info=_model_info(model, padded),
        by_operator=merge(counter.by_op),
        zero_ops=merge(counter.zero_ops),
        unsupported=merge(counter.unsupported),
    )


def count_preset(preset: str, size: tuple[int, int] = (800, 1088), batch: int = 1, num_classes: int | None = None,
                 overrides: list[str] | None = None, name: str | None = None) -> FlopReport:
    """Builds `preset` directly on the meta device (no weights are allocated) and counts it."""
    import proscale

    with torch.device("meta"):
        model = proscale.build_model(preset, num_classes=num_classes, overrides=overrides)
    label = name or (preset + ("[" + ",".join(overrides) + "]" if overrides else ""))
    return count_flops(model, size, batch, name=label)


# --------------------------------------------------------------------------------------------
# Cross-check with fvcore's own tracer
# --------------------------------------------------------------------------------------------

def _fvcore_sdpa(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    return _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


def fvcore_count(model: nn.Module, size: tuple[int, int], batch: int = 1) -> dict[str, int]:
    """FLOPs of backbone / pixel_decoder (and its encoder) / transformer_decoder / total from
    fvcore.nn.FlopCountAnalysis (JIT trace of a real forward on a copy, MSDA in the
    grid_sample form, a handle added for scaled_dot_product_attention). Slow at full size on a
    CPU; the tests run it small to check `count_flops` against it.

    Backbone and pixel decoder agree exactly. In the transformer decoder fvcore comes out a
    little lower (7e-5 at 800x1088) for two reasons of its own: the JIT graph drops the
    resize of the last prediction's attention mask (computed, but no output uses it), and
    its einsum handle parses numpy's printed path, rounded to 4 significant digits."""
    from fvcore.nn import FlopCountAnalysis

    work = copy.deepcopy(model).eval()
    _force_reference_msda(work)

    class _Outputs(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, x):
            out = self.model(x)
            # Return every prediction: the JIT graph drops whatever does not reach an output.
            aux = [t for a in out["aux_outputs"] for t in (a["pred_logits"], a["pred_masks"])]
            return tuple([out["pred_logits"], out["pred_masks"]] + aux)

    param = next(work.parameters())
    images = torch.zeros(batch, 3, *_padded(model, size), device=param.device)
    with torch.no_grad():
        analysis = FlopCountAnalysis(_Outputs(work), (images,))
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 800x1088, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flops", help="per-component GFLOPs (fvcore convention), optionally vs another preset",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="proscale_r50_333")
    p.add_argument("--size", type=parse_size, default=(800, 1088), help="HxW input size (padded to /32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vs", default=None, help="a second preset, shown side by side with ratios (vs/preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --preset, e.g. encoder.plan=1,1,1 (repeatable)")
    p.add_argument("--vs-set", dest="vs_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for --vs (repeatable)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_main)


def _main(args) -> int:
    first = count_preset(args.preset, args.size, args.batch, args.num_classes, args.overrides or None)
    reports = [first]
    if args.vs:
        reports.append(count_preset(args.vs, args.size, args.batch, args.num_classes, args.vs_overrides or None))
    if args.json:
        out: dict = {"reports": [r.to_dict() for r in reports]}
        if len(reports) == 2:
            a, b = reports
            out["ratio"] = {k: (b.flops[k] / a.flops[k] if a.flops[k] else None) for k in ORDER}
        print(json.dumps(out, indent=2))
    else:
        print(format_table(reports))
    return 0
