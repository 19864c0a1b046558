"""Reduced-precision inference (`--dtype bf16`): the hardware check and the accuracy of bf16."""
import pytest
import torch

import proscale
from proscale import precision
from proscale.precision import PrecisionError, resolve_dtype


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "avx2", "avx512f"}))
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)


@pytest.fixture
def bf16_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))


def test_bf16_refused_on_cpu_without_units(no_bf16_units):
    with pytest.raises(PrecisionError, match="avx512_bf16") as e:
        resolve_dtype("bf16", "cpu")
    assert "--dtype fp32" in str(e.value)
    with pytest.raises(PrecisionError, match="amx_fp16"):
        resolve_dtype("fp16", "cpu")
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16  # CUDA: torch decides
    with pytest.raises(PrecisionError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_bf16_accepted_with_units_or_forced(bf16_units, monkeypatch):
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert precision.cpu_units("bf16") == ("avx512_bf16",)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def test_real_cpu_flags_are_read():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux
        assert "fpu" in flags or "sse2" in flags or "asimd" in flags


def test_predictor_refuses_bf16_without_units(no_bf16_units):
    model = proscale.build_model("proscale_tiny_333", num_classes=4)
    with pytest.raises(PrecisionError):
        proscale.Predictor(model, device="cpu", dtype="bf16")


def test_cli_refuses_bf16_without_units(no_bf16_units, capsys):
    from proscale.cli import main

    assert main(["bench", "--preset", "m2f_tiny", "--vs", "", "--size", "64x64", "--dtype", "bf16"]) == 2
    assert "avx512_bf16" in capsys.readouterr().err


def test_msda_locations_and_softmax_stay_fp32_under_bf16_autocast(monkeypatch):
    import proscale.models.ms_deform_attn as mda

    seen = {}
    real = mda.ms_deform_attn

    def spy(value, shapes, loc, attn, backend="auto"):
        seen.update(value=value.dtype, loc=loc.dtype, attn=attn.dtype)
        return real(value, shapes, loc, attn, backend=backend)

    monkeypatch.setattr(mda, "ms_deform_attn", spy)
    torch.manual_seed(0)
    attn = mda.MSDeformAttn(64, n_levels=2, n_heads=4, n_points=2).eval()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.05)
    shapes = ((6, 8), (12, 16))
    x = torch.randn(1, 48 + 192, 64)
    ref = torch.rand(1, 240, 2, 2)
    with torch.no_grad():
        full = attn(x, ref, x, shapes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x, ref, x, shapes)
    assert seen == {"value": torch.bfloat16, "loc": torch.float32, "attn": torch.float32}
    assert (low.float() - full).abs().max() < 0.05 * full.abs().max()


def test_bf16_model_close_to_fp32_and_predictor_runs(bf16_units):
    """A (random) PRO-SCALE model under bf16 autocast: logits and masks near fp32, and the
    Predictor's results in fp32 at the original size."""
    torch.manual_seed(0)
    model = proscale.build_model("proscale_tiny_333", num_classes=4).eval()
    images = torch.randint(0, 256, (1, 3, 96, 128)).float()
    with torch.inference_mode():
        full = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    for key in ("pred_logits", "pred_masks"):
        a, b = full[key], low[key].float()
        rel = (a - b).norm() / a.norm()
        assert rel < 0.05, (key, float(rel))
    out = proscale.Predictor(model, device="cpu", dtype="bf16", tasks=("panoptic", "semantic")).predict(
        torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8))
    assert out["panoptic"]["panoptic_seg"].shape == (90, 120)
    assert out["sem_seg"].dtype == torch.float32


def test_int8_benchmark_quantises_every_linear_layer():
    """benchmarks/precision.py's int8 variant: every linear layer of the encoder and decoder
    (proscale's oneDNN Linear included) becomes a dynamic int8 layer; outputs stay near fp32."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from precision import quantize_linear_int8

    from proscale.kernels.linear import Linear

    torch.manual_seed(0)
    model = proscale.build_model("proscale_tiny_333", num_classes=4).eval()
    quantised = quantize_linear_int8(model)
    kinds = {type(m).__name__ for m in quantised.modules()}
    assert not any(type(m) in (torch.nn.Linear, Linear) for m in quantised.modules()), kinds
    assert "Linear" in kinds  # torch.ao's dynamic quantised Linear
    images = torch.randint(0, 256, (1, 3, 96, 128)).float()
    with torch.inference_mode():
        a, b = model(images)["pred_masks"], quantised(images)["pred_masks"]
    assert (a - b).norm() / a.norm() < 0.1
