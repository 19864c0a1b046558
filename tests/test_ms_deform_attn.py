"""MSDA: the grid_sample reference and the fused CPU path against a loop-based definition, the
dispatch between back ends, and the MSDeformAttn module (its `backend` attribute)."""
from __future__ import annotations

import math

import pytest
import torch

from proscale import kernels
from proscale.kernels import msda_fused, ms_deform_attn, select_backend
from proscale.kernels.msda_fused import ms_deform_attn_fused
from proscale.kernels.msda_pure import ms_deform_attn_pure
from proscale.models.ms_deform_attn import MSDeformAttn, use_msda_backend

SHAPES = ((3, 5), (4, 2), (2, 3))  # non-square levels, one taller than wide


def loop_reference(value, spatial_shapes, loc, attn):
    """MSDA from its definition, one sample at a time (float64 python arithmetic).

    Point (x, y) in [0, 1] of level l reads pixel coordinates u = x*W - 0.5, v = y*H - 0.5
    (pixel centres at (i+0.5)/W, align_corners=False), interpolates bilinearly between the 4
    surrounding pixels, and a pixel outside the map reads 0.
    """
    B, S, M, D = value.shape
    _, Nq, _, L, P, _ = loc.shape
    val = value.double()
    out = torch.zeros(B, Nq, M, D, dtype=torch.float64)
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Nq):
            for m in range(M):
                for lvl, (h, w) in enumerate(spatial_shapes):
                    for p in range(P):
                        x, y = (float(c) for c in loc[b, q, m, lvl, p])
                        a = float(attn[b, q, m, lvl, p])
                        u, v = x * w - 0.5, y * h - 0.5
                        u0, v0 = math.floor(u), math.floor(v)
                        for yi, wy in ((v0, v0 + 1 - v), (v0 + 1, v - v0)):
                            for xi, wx in ((u0, u0 + 1 - u), (u0 + 1, u - u0)):
                                if 0 <= xi < w and 0 <= yi < h:
                                    out[b, q, m] += a * wy * wx * val[b, starts[lvl] + yi * w + xi, m]
    return out.view(B, Nq, M * D)


def make_inputs(dtype=torch.float64, B=2, Nq=5, M=2, D=3, P=2, shapes=SHAPES, seed=0, quantized=False):
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    if quantized:
        # Odd multiples of 2^-11: loc * W and grid_sample's (2 loc - 1 + 1) * W / 2 are exact in
        # fp32 and never integers, so every implementation sees the same pixel coordinates.
        loc = (torch.randint(-300, 1324, (B, Nq, M, L, P, 2), generator=g).double() + 0.5) / 1024
    else:
        loc = torch.rand(B, Nq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # partly outside
    attn = torch.randn(B, Nq, M, L * P, generator=g, dtype=torch.float64).softmax(-1).view(B, Nq, M, L, P)
    return value.to(dtype), loc.to(dtype), attn.to(dtype)


def grads(fn, value, shapes, loc, attn, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


@pytest.mark.parametrize("fn", [ms_deform_attn_pure, ms_deform_attn_fused], ids=["reference", "fused"])
def test_matches_loop_definition_float64(fn):
    value, loc, attn = make_inputs()
    out = fn(value, SHAPES, loc, attn)
    torch.testing.assert_close(out, loop_reference(value, SHAPES, loc, attn), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [ms_deform_attn_pure, ms_deform_attn_fused], ids=["reference", "fused"])
def test_matches_loop_definition_float32(fn):
    value, loc, attn = make_inputs(torch.float32, quantized=True)
    out = fn(value, SHAPES, loc, attn)
    torch.testing.assert_close(out.double(), loop_reference(value, SHAPES, loc, attn), rtol=0, atol=1e-5)


def test_fused_matches_reference_float32_values_and_grads():
    value, loc, attn = make_inputs(torch.float32, B=2, Nq=7, M=3, D=4, P=3, quantized=True)
    ref = grads(ms_deform_attn_pure, value, SHAPES, loc, attn)
    got = grads(ms_deform_attn_fused, value, SHAPES, loc, attn)
    for name, r, f in zip(("out", "value", "loc", "attn"), ref, got):
        scale = max(1.0, r.abs().max().item())  # location gradients are O(W): compare relatively
        torch.testing.assert_close(f, r, rtol=0, atol=1e-5 * scale, msg=name)


def test_fused_as_accurate_as_reference_on_random_locations():
    """With arbitrary fp32 locations both paths round the pixel coordinate differently (an ulp
    of x); each must stay as close to the float64 truth as the other."""
    value, loc, attn = make_inputs(torch.float32, B=1, Nq=64, M=4, D=8, P=4, shapes=((13, 17), (7, 30)))
    shapes = ((13, 17), (7, 30))
    truth = ms_deform_attn_pure(value.double(), shapes, loc.double(), attn.double())
    err_ref = (ms_deform_attn_pure(value, shapes, loc, attn).double() - truth).abs().max().item()
    err_fused = (ms_deform_attn_fused(value, shapes, loc, attn).double() - truth).abs().max().item()
    assert err_fused <= max(2 * err_ref, 1e-5)


def test_gradcheck_reference_float64():
    value, loc, attn = make_inputs(B=1, Nq=2, M=2, D=2, P=1, shapes=((2, 3), (3, 2)))
    inputs = [t.requires_grad_(True) for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_pure(v, ((2, 3), (3, 2)), l, a), inputs)


def test_gradcheck_fused_float64():
    value, loc, attn = make_inputs(B=2, Nq=3, M=2, D=2, P=2, shapes=((2, 3), (3, 2)))
    inputs = [t.requires_grad_(True) for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn_fused(v, ((2, 3), (3, 2)), l, a), inputs)


def test_fused_chunking_and_int64_rows_match(monkeypatch):
    value, loc, attn = make_inputs(torch.float64, B=3, Nq=4)
    ref = grads(ms_deform_attn_fused, value, SHAPES, loc, attn)
    monkeypatch.setattr(msda_fused, "MAX_SAMPLES_PER_CHUNK", 1)  # one image per chunk
    monkeypatch.setattr(msda_fused, "DOT_BLOCK_BAGS", 5)  # ragged dot blocks
    monkeypatch.setattr(msda_fused, "EXACT_FLOAT_ROWS", {})  # integer row arithmetic
    got = grads(ms_deform_attn_fused, value, SHAPES, loc, attn)
    for r, f in zip(ref, got):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-12)


def test_fused_half_inputs_accumulate_in_fp32():
    value, loc, attn = make_inputs(torch.float32, B=1, Nq=16, M=2, D=8, P=2)
    ref = ms_deform_attn_pure(value, SHAPES, loc, attn)
    for dtype in (torch.bfloat16, torch.float16):
        out = ms_deform_attn_fused(value.to(dtype), SHAPES, loc, attn)  # AMP: value half, locations fp32
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_fused_far_and_nan_locations_read_zero():
    value, loc, attn = make_inputs(torch.float32, B=1, Nq=4)
    loc[0, 0] = float("nan")
    loc[0, 1] = 1e9
    loc[0, 2] = -1e9
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_fused(leaves[0], SHAPES, leaves[1], leaves[2])
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_fused_empty_queries():
    value, loc, attn = make_inputs(torch.float32, Nq=0)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_fused(leaves[0], SHAPES, leaves[1], leaves[2])
    assert out.shape == (2, 0, 6)
    out.sum().backward()
    assert torch.count_nonzero(leaves[0].grad) == 0


def test_fused_saves_only_inputs_for_backward():
    value, loc, attn = make_inputs(torch.float32, B=1, Nq=32, M=2, D=4, P=2)
    saved = []
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ms_deform_attn_fused(leaves[0], SHAPES, leaves[1], leaves[2])
    assert sum(t.numel() for t in saved) == sum(t.numel() for t in leaves)


# ---- dispatch -------------------------------------------------------------------------------

def test_dispatch_picks_fused_on_cpu_and_honours_env(monkeypatch):
    value, loc, attn = make_inputs(torch.float32)
    monkeypatch.delenv("PROSCALE_MSDA", raising=False)
    assert select_backend(value) == "fused"
    for name in ("pure", "fused"):
        monkeypatch.setenv("PROSCALE_MSDA", name)
        assert select_backend(value) == name
        torch.testing.assert_close(ms_deform_attn(value, SHAPES, loc, attn),
                                   ms_deform_attn_pure(value, SHAPES, loc, attn), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("PROSCALE_MSDA", "cuda-op")
    with pytest.raises(ValueError, match="PROSCALE_MSDA"):
        ms_deform_attn(value, SHAPES, loc, attn)
    # A named back end wins over the environment; an unknown name is refused.
    torch.testing.assert_close(ms_deform_attn(value, SHAPES, loc, attn, backend="pure"),
                               ms_deform_attn_pure(value, SHAPES, loc, attn), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cuda-op"):
        ms_deform_attn(value, SHAPES, loc, attn, backend="cuda-op")


def test_kernels_do_not_import_models():
    """The kernels sit below the model (the module imports them, never the other way round)."""
    import ast
    from pathlib import Path

    imported = set()
    for path in Path(kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    assert "proscale.kernels.msda_pure" in imported  # the scan sees the package's own imports
    assert not [name for name in imported if name.startswith("proscale.models")]


def test_dispatch_refuses_triton_on_cpu_without_interpreter(monkeypatch):
    if not kernels.triton_available():
        pytest.skip("Triton not importable here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    value, loc, attn = make_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        ms_deform_attn(value, SHAPES, loc, attn, backend="triton")


def test_dispatch_uses_reference_while_exporting(monkeypatch):
    """Exported graphs must hold the standard grid_sample op (ONNX GridSample), not our Function,
    even when a faster back end is forced for eager runs."""
    monkeypatch.setenv("PROSCALE_MSDA", "fused")
    value, loc, attn = make_inputs(torch.float32)

    class Core(torch.nn.Module):
        def forward(self, v, l, a):
            return ms_deform_attn(v, SHAPES, l, a)

    program = torch.export.export(Core(), (value, loc, attn))
    assert "grid_sampler" in program.graph_module.code


# ---- module ---------------------------------------------------------------------------------

def test_module_init_offsets_and_uniform_weights():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    # Head m points along angle 2*pi*m/8, scaled so the larger coordinate is 1; point p at radius p+1.
    for m in range(8):
        theta = 2 * math.pi * m / 8
        d = torch.tensor([math.cos(theta), math.sin(theta)])
        d = d / d.abs().max()
        for p in range(4):
            for lvl in range(3):
                torch.testing.assert_close(bias[m, lvl, p], d * (p + 1))
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    q = torch.randn(2, 5, 32)
    w = attn.attention_weights(q).view(2, 5, 8, 12).softmax(-1)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 12))


def module_inputs(seed=0):
    """A 2-level MSDeformAttn with non-trivial offsets and weights, and its inputs."""
    torch.manual_seed(seed)
    shapes = ((2, 3), (4, 5))
    S = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.1)
        attn.attention_weights.weight.normal_(0, 0.1)
    query, value = torch.randn(2, 7, 16), torch.randn(2, S, 16)
    ref_points = torch.rand(1, 7, 2, 2)
    return attn, (query, ref_points, value, shapes)


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_module_forward_shape_and_backends_agree(backend):
    attn, inputs = module_inputs()
    assert attn.backend == "auto"
    attn.backend = "pure"
    expected = attn(*inputs)
    attn.backend = backend
    out = attn(*inputs)
    assert out.shape == (2, 7, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def spy_on_kernels(monkeypatch) -> list[str]:
    """Records the name of every MSDA core the dispatcher runs (and still runs it)."""
    calls: list[str] = []
    for name in ("ms_deform_attn_pure", "ms_deform_attn_fused"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def test_module_backend_attribute_reaches_the_dispatch(monkeypatch):
    calls = spy_on_kernels(monkeypatch)
    monkeypatch.setenv("PROSCALE_MSDA", "fused")
    attn, inputs = module_inputs()
    attn(*inputs)  # "auto": the environment decides
    attn.backend = "pure"  # a named back end wins over the environment
    attn(*inputs)
    assert calls == ["ms_deform_attn_fused", "ms_deform_attn_pure"]
    assert "backend='pure'" in repr(attn)
    attn.backend = "cuda-op"
    with pytest.raises(ValueError, match="cuda-op"):
        attn(*inputs)
    with pytest.raises(ValueError, match="cuda-op"):
        MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, backend="cuda-op")


def test_use_msda_backend_switches_every_module_and_restores(monkeypatch):
    calls = spy_on_kernels(monkeypatch)
    monkeypatch.setenv("PROSCALE_MSDA", "fused")
    first, inputs = module_inputs()
    second = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, backend="fused")
    model = torch.nn.ModuleList([first, torch.nn.Sequential(second)])
    with use_msda_backend(model, "pure") as n:
        assert n == 2 and first.backend == second.backend == "pure"
        first(*inputs)
        second(*inputs)
    assert calls == ["ms_deform_attn_pure", "ms_deform_attn_pure"]
    assert (first.backend, second.backend) == ("auto", "fused")
    with pytest.raises(RuntimeError, match="inside"):
        with use_msda_backend(model, "pure"):
            raise RuntimeError("inside")
    assert (first.backend, second.backend) == ("auto", "fused")  # restored on error too
    with pytest.raises(ValueError):
        with use_msda_backend(model, "cuda-op"):
            pass
    assert (first.backend, second.backend) == ("auto", "fused")


def test_module_rejects_inconsistent_spatial_shapes():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2)
    query, value, ref = torch.randn(1, 3, 16), torch.randn(1, 10, 16), torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError):
        attn(query, ref, value, ((2, 3), (2, 3)))  # 12 tokens described, 10 given
    with pytest.raises(ValueError):
        attn(query, ref, value, ((2, 5),))  # one level for a two-level module


def test_inference_softmax_equals_torch_softmax():
    from proscale.models.ms_deform_attn import _softmax_last

    x = torch.randn(2, 50, 8, 12) * 30  # large logits: the max is subtracted first
    with torch.no_grad():
        got = _softmax_last(x.clone())
    torch.testing.assert_close(got, x.softmax(-1), rtol=1e-6, atol=1e-7)
    y = x.clone().requires_grad_(True)
    (_softmax_last(y) * torch.arange(12.0)).sum().backward()  # with gradients: torch's own
    assert y.grad is not None and y.grad.abs().sum() > 0
