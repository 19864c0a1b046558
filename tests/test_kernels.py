"""Triton MSDA kernels against the pure PyTorch reference (values and gradients).

Two places they can run:
  * Triton's interpreter on CPU tensors. It must be switched on before Triton is imported, so
    the default run re-runs this file's `interpreter` tests in a subprocess with
    TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 pytest tests/test_kernels.py -k interpreter` runs
    them directly).
  * CUDA, when a GPU is present (skipped otherwise).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from proscale import kernels
from proscale.kernels.msda_pure import ms_deform_attn_pure

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

SHAPES = ((3, 5), (6, 4), (2, 7))


def make_inputs(B=2, Nq=70, M=3, D=6, P=2, shapes=SHAPES, device="cpu", seed=0):
    """Nq=70 leaves ragged query blocks; D=6 exercises the channel mask (BLOCK_D=8)."""
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g)
    loc = torch.rand(B, Nq, M, L, P, 2, generator=g) * 1.6 - 0.3  # partly outside the maps
    attn = torch.randn(B, Nq, M, L * P, generator=g).softmax(-1).view(B, Nq, M, L, P)
    return value.to(device), loc.to(device), attn.to(device)


def run_with_grads(fn, value, shapes, loc, attn, seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def assert_matches_reference(fn, value, loc, attn, shapes=SHAPES, tol=1e-4):
    """Output and the three gradients of fn against ms_deform_attn_pure, in fp32."""
    ref = run_with_grads(ms_deform_attn_pure, value.float(), shapes, loc.float(), attn.float())
    got = run_with_grads(fn, value, shapes, loc, attn)
    dtypes = (value.dtype, value.dtype, loc.dtype, attn.dtype)
    for name, r, f, dtype in zip(("output", "grad value", "grad locations", "grad attention"), ref, got, dtypes):
        assert f.dtype == dtype, name
        scale = max(1.0, r.abs().max().item())  # location gradients are O(W): compare relatively
        torch.testing.assert_close(f.float(), r, rtol=0, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def rounded_reference(value, loc, attn, dtype, shapes=SHAPES):
    """The fp32 reference on inputs rounded to dtype: what an fp32-accumulating kernel should give."""
    return ms_deform_attn_pure(*(t.to(dtype).float() for t in (value,)), shapes,
                               *(t.to(dtype).float() for t in (loc, attn)))


# ---- interpreter (CPU) ----------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not importable in this environment")
@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_interpreter_suite_in_subprocess():
    """Runs the interpreter tests below in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreter and not subprocess",
           "-p", "no:cacheprovider", "-rs"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-4000:]
    if "INTERPRETER UNUSABLE" in tail and proc.returncode != 0:
        pytest.skip("Triton's interpreter cannot run kernels here:\n" + tail)
    assert proc.returncode == 0, tail
    assert "3 passed" in tail and "skipped" not in tail, tail  # the kernels really ran


def _interpreter_module():
    """The kernel module, usable on CPU only when this process imported Triton interpreting."""
    if not HAS_TRITON:
        pytest.skip("Triton is not importable in this environment")
    if not INTERPRETING:
        pytest.skip("needs TRITON_INTERPRET=1 before Triton is imported (run via the subprocess test)")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            tl.atomic_add(x_ptr + o, tl.zeros((BLOCK,), dtype=tl.float32) + 1.0, sem="relaxed")

        x = torch.zeros(4)
        _probe[(2,)](x, BLOCK=4)
        assert torch.equal(x, torch.full((4,), 2.0))
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.fail(f"INTERPRETER UNUSABLE: {exc!r}")
    from proscale.kernels import msda_triton

    return msda_triton


def test_interpreter_fp32_matches_reference():
    mod = _interpreter_module()
    value, loc, attn = make_inputs()
    assert_matches_reference(mod.ms_deform_attn_triton, value, loc, attn, tol=1e-4)


def test_interpreter_half_inputs_accumulate_in_fp32():
    mod = _interpreter_module()
    value, loc, attn = make_inputs(B=1, Nq=40)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 4e-2)):
        out = mod.ms_deform_attn_triton(value.to(dtype), SHAPES, loc.to(dtype), attn.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), rounded_reference(value, loc, attn, dtype), rtol=0, atol=tol)
    # AMP layout: half values, fp32 locations and weights; gradients come back in each input's dtype.
    leaves = [value.bfloat16().requires_grad_(True), loc.clone().requires_grad_(True),
              attn.clone().requires_grad_(True)]
    out = mod.ms_deform_attn_triton(leaves[0], SHAPES, leaves[1], leaves[2])
    out.float().sum().backward()
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]


def test_interpreter_far_and_nan_locations_read_zero():
    mod = _interpreter_module()
    value, loc, attn = make_inputs(B=1, Nq=4)
    loc[0, 0] = float("nan")
    loc[0, 1] = 1e9
    loc[0, 2] = -1e9
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = mod.ms_deform_attn_triton(leaves[0], SHAPES, leaves[1], leaves[2])
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# ---- ahead-of-time compile for an H100 (no GPU needed) --------------------------------------

def _compile_sm90(fn, pointer_types: dict, constexprs: dict, num_warps: int = 4):
    """Compiles a kernel for sm_90 with Triton's bundled ptxas, as a CUDA launch would (pointer
    arguments 16-byte aligned). Returns the PTX text. Skips if this Triton's AOT API differs."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"Triton AOT API not available: {exc!r}")
    names = fn.arg_names
    signature = {n: pointer_types.get(n, "i32" if n in ("Nq", "S") else "constexpr") for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointer_types}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    except TypeError as exc:
        pytest.skip(f"Triton AOT API differs here: {exc!r}")
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    return kernel.asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not importable in this environment")
@pytest.mark.skipif(INTERPRETING, reason="compiles real kernels")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the CUDA tests compile and run the kernels for real")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_h100(dtype):
    """Both kernels compile to sm_90 PTX for the real sizes (M=8, D=32, L=3, P=4), with vector
    loads (the channel tile is read 4 x 32 bit at a time) and vector atomics in the backward."""
    from proscale.kernels import msda_triton as mt

    consts = dict(M=8, D=32, L=3, P=4, BLOCK_D=32, EVEN_D=True)
    inputs = {"value_ptr": f"*{dtype}", "loc_ptr": "*fp32", "attn_ptr": "*fp32", "shapes_ptr": "*i32"}
    fwd = _compile_sm90(mt._msda_fwd_kernel, {**inputs, "out_ptr": f"*{dtype}"},
                        {**consts, "BLOCK_Q": mt.FORWARD_CONFIG["block_q"]}, mt.FORWARD_CONFIG["num_warps"])
    bwd = _compile_sm90(mt._msda_bwd_kernel, {**inputs, "grad_out_ptr": f"*{dtype}", "grad_value_ptr": "*fp32",
                                              "grad_loc_ptr": "*fp32", "grad_attn_ptr": "*fp32"},
                        {**consts, "BLOCK_Q": mt.BACKWARD_CONFIG["block_q"]}, mt.BACKWARD_CONFIG["num_warps"])
    assert "ld.global" in fwd and "atom.global" in bwd
    if dtype == "fp32":
        assert ".v4" in fwd, "value tiles are no longer read with vector loads"
        assert "add.v4.f32" in bwd, "grad_value is no longer accumulated with vector atomics"


# ---- CUDA -----------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (HAS_CUDA and kernels.triton_available()) or INTERPRETING,
                                reason="needs a CUDA GPU and Triton")


@needs_cuda
def test_cuda_dispatch_picks_triton(monkeypatch):
    monkeypatch.delenv("PROSCALE_MSDA", raising=False)
    value, _, _ = make_inputs(device="cuda")
    assert kernels.select_backend(value) == "triton"
    assert kernels.select_backend(value.double()) == "fused"


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "fused"])
def test_cuda_fp32_matches_reference(backend):
    shapes = ((25, 34), (50, 68))  # R50 res5 / res4 at 800x1088
    value, loc, attn = make_inputs(B=2, Nq=25 * 34 + 50 * 68, M=8, D=32, P=4, shapes=shapes, device="cuda")
    fn = lambda v, s, l, a: kernels.ms_deform_attn(v, s, l, a, backend=backend)  # noqa: E731
    assert_matches_reference(fn, value, loc, attn, shapes=shapes, tol=1e-4)


@needs_cuda
def test_cuda_half_inputs():
    value, loc, attn = make_inputs(device="cuda")
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 4e-2)):
        out = kernels.ms_deform_attn(value.to(dtype), SHAPES, loc.to(dtype), attn.to(dtype), backend="triton")
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), rounded_reference(value, loc, attn, dtype), rtol=0, atol=tol)
    # AMP layout: half values, fp32 locations and weights.
    out = kernels.ms_deform_attn(value.bfloat16(), SHAPES, loc, attn, backend="triton")
    torch.testing.assert_close(out.float(), rounded_reference(value, loc, attn, torch.bfloat16), rtol=0, atol=4e-2)


@needs_cuda
def test_cuda_no_host_sync_and_cuda_graph():
    value, loc, attn = make_inputs(device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    kernels.ms_deform_attn(leaves[0], SHAPES, leaves[1], leaves[2], backend="triton").sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kernels.ms_deform_attn(leaves[0], SHAPES, leaves[1], leaves[2], backend="triton")
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Forward under a CUDA graph replays to the same result.
    static = [t.clone() for t in (value, loc, attn)]
    with torch.no_grad():
        kernels.ms_deform_attn(static[0], SHAPES, static[1], static[2], backend="triton")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = kernels.ms_deform_attn(static[0], SHAPES, static[1], static[2], backend="triton")
    static[0].mul_(2)
    graph.replay()
    torch.testing.assert_close(out, 2 * ms_deform_attn_pure(value, SHAPES, loc, attn), rtol=0, atol=1e-4)


# ---- benchmarks/gpu.py plumbing -------------------------------------------------------------

@pytest.mark.skipif(INTERPRETING, reason="not part of the interpreter run")
def test_gpu_benchmark_quick_cpu_run(tmp_path):
    """The GPU benchmark's CPU-side logic: every section runs or records its error, one table, JSON."""
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "proscale_gpu_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--device", "cpu", "--quick", "--backends", "fused,triton", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["table"] == result["table"] and "| batch | mode | MSDA |" in data["table"]
    enc = [r for r in data["records"] if r.get("section") == "encoder"]
    assert {r["plan"] for r in enc} == {"baseline", "(3,3,3)", "(1,1,1)"}
    ok = [r for r in enc if r["backend"] == "fused" and "graph" not in r["mode"]]
    assert ok and all(r["median_ms"] > 0 and "error" not in r for r in ok)
    # No GPU here: Triton and CUDA graphs are recorded as errors, not raised.
    assert all("error" in r for r in enc if r["backend"] == "triton" or "graph" in r["mode"])
    correctness = next(r for r in data["records"] if r.get("name") == "correctness fused")
    assert correctness["max_abs_err_output"] < 1e-5
