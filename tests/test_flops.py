"""FLOP counting (proscale.analysis.flops): the analytic per-token formula, component
bookkeeping, the reference numbers of docs/flops.md, fvcore agreement, JSON and the CLI.

Counting runs on meta tensors (no arithmetic), so even R50 at 800x1088 takes about a second.
"""
import argparse
import importlib
import json

import pytest
import torch

import proscale
from proscale.analysis import flops as F
from proscale.analysis.flop_counter import FlopCounter, encoder_layer_flops_per_token
from proscale.analysis.flop_report import AGGREGATES, LABELS, LEAVES, ORDER, component_totals
from proscale.analysis.flops import count_flops, count_preset
from proscale.models.ms_deform_attn import MSDeformAttn


def tokens(size):
    """(N5, N4, N3) for an input padded to /32."""
    h, w = (-(-s // 32) * 32 for s in size)
    return tuple((h // s) * (w // s) for s in (32, 16, 8))


TINY = (96, 128)


@pytest.fixture(scope="module")
def r50_reports():
    return {name: count_preset(name, (800, 1088)) for name in ("m2f_r50", "proscale_r50_333")}


@pytest.fixture(scope="module")
def tiny_reports():
    return {name: count_preset(name, TINY) for name in ("m2f_tiny", "proscale_tiny_333")}


def test_formula_constants():
    for L in (1, 2, 3):
        assert encoder_layer_flops_per_token(256, L, 8, 4, 1024) == 657_920 + 28_672 * L


def _check_layers(report, preset, size):
    cfg = proscale.get_preset(preset).encoder
    n5, n4, n3 = tokens(size)
    seq = {1: n5, 2: n5 + n4, 3: n5 + n4 + n3}
    assert len(report.layers) == sum(cfg.plan)
    for layer in report.layers:
        per_token = encoder_layer_flops_per_token(cfg.d_model, layer["stage"], cfg.n_heads, cfg.n_points, cfg.ffn_dim)
        assert layer["levels"] == layer["stage"]
        assert layer["tokens"] == seq[layer["stage"]]
        assert layer["flops"] == layer["analytic"] == seq[layer["stage"]] * per_token
    for stage in (1, 2, 3):
        expected = sum(lay["flops"] for lay in report.layers if lay["stage"] == stage)
        assert report.flops[f"pixel_decoder.encoder.stage{stage}"] == expected


@pytest.mark.parametrize("preset", ["m2f_tiny", "proscale_tiny_333"])
def test_encoder_layers_equal_formula(tiny_reports, preset):
    _check_layers(tiny_reports[preset], preset, TINY)


def test_encoder_layers_equal_formula_r50_dims():
    # d 256, 8 heads, 4 points, FFN 1024: 657,920 + 28,672 L per token, at a small size.
    _check_layers(count_preset("proscale_r50_333", (64, 96)), "proscale_r50_333", (64, 96))


def test_component_tables():
    # One list of components: every row has a label, the leaves are the rows that are no aggregate.
    assert ORDER == tuple(LABELS) and ORDER[-1] == "total"
    assert set(LEAVES) | set(AGGREGATES) == set(ORDER) and not set(LEAVES) & set(AGGREGATES)
    totals = component_totals({"backbone": 5, "pixel_decoder.trc": 2, "pixel_decoder.fpn.output": 3, "stray": 1})
    assert list(totals) == list(ORDER)
    assert totals["other"] == 1  # a label that is no leaf is booked to "other"
    assert (totals["pixel_decoder"], totals["pixel_decoder.fpn"], totals["total"]) == (5, 3, 11)


def test_components_present_and_sum_to_total(tiny_reports):
    report = tiny_reports["proscale_tiny_333"]
    assert list(report.flops) == list(ORDER) and list(report.gflops) == list(ORDER)
    assert report.leaves_sum() == report.flops["total"]
    for agg, prefix in AGGREGATES.items():
        assert report.flops[agg] == sum(report.flops[k] for k in LEAVES if k.startswith(prefix))
    for key in ("backbone", "pixel_decoder.input_proj", "pixel_decoder.encoder.stage1", "pixel_decoder.trc",
                "pixel_decoder.fpn.lateral", "pixel_decoder.fpn.output", "pixel_decoder.mask_features",
                "transformer_decoder"):
        assert report.flops[key] > 0, key
    # The pixel decoder's own body and the pre-processing hold no arithmetic of their own.
    assert report.flops["pixel_decoder.other"] == 0 and report.flops["other"] == 0
    assert abs(sum(report.gflops[k] for k in LEAVES) - report.gflops["total"]) < 1e-9


@pytest.mark.parametrize("preset", ["proscale_tiny_333", "m2f_swin_t"])
def test_no_unsupported_operators(tiny_reports, preset):
    report = tiny_reports.get(preset) or count_preset(preset, (64, 64))
    assert report.unsupported == {}
    # MSDA is counted in its grid_sample form, its softmax (written out without gradients:
    # max, exp, sum, divide) and weighted sum as 0.
    stage3 = report.by_operator["pixel_decoder.encoder.stage3"]
    assert stage3["grid_sampler_2d"] > 0
    assert {"amax", "exp", "div", "mul", "sum"} <= set(report.zero_ops["pixel_decoder.encoder.stage3"])


def test_unsupported_operator_is_reported():
    # An operator without a handle is listed, never silently dropped.
    counter = FlopCounter(root="other")
    counter.scope.append("pixel_decoder.other")
    with counter:
        torch.linalg.det(torch.eye(3))
    assert counter.unsupported["pixel_decoder.other"]


def test_reference_numbers_r50(r50_reports):
    """docs/flops.md "ref." columns: R50 800x1088 GFLOPs (within 3%) and the cuts."""
    base, ps = r50_reports["m2f_r50"].gflops, r50_reports["proscale_r50_333"].gflops
    for value, ref in ((base["pixel_decoder"], 122.2), (base["pixel_decoder.encoder"], 79.7),
                       (ps["pixel_decoder"], 61.2), (ps["pixel_decoder.encoder"], 50.7),
                       (base["backbone"], 70.9), (base["transformer_decoder"], 25.3)):
        assert abs(value / ref - 1) < 0.03, (value, ref)
    assert 1 - ps["pixel_decoder"] / base["pixel_decoder"] >= 0.49
    assert 1 - ps["total"] / base["total"] >= 0.27
    n = sum(tokens((800, 1088)))
    assert r50_reports["m2f_r50"].flops["pixel_decoder.encoder"] == 6 * n * (657_920 + 28_672 * 3)
    assert r50_reports["proscale_r50_333"].unsupported == {}


def test_proscale_ratio_from_token_counts(tiny_reports):
    size = TINY
    base, ps = tiny_reports["m2f_tiny"], tiny_reports["proscale_tiny_333"]
    cfg = proscale.get_preset("m2f_tiny").encoder
    f = [encoder_layer_flops_per_token(cfg.d_model, L, cfg.n_heads, cfg.n_points, cfg.ffn_dim) for L in (1, 2, 3)]
    n5, n4, n3 = tokens(size)
    expected = (3 * n5 * f[0] + 3 * (n5 + n4) * f[1] + 3 * (n5 + n4 + n3) * f[2]) / (6 * (n5 + n4 + n3) * f[2])
    ratio = ps.flops["pixel_decoder.encoder"] / base.flops["pixel_decoder.encoder"]
    assert ratio == pytest.approx(expected, rel=1e-12)
    assert ps.flops["pixel_decoder"] < base.flops["pixel_decoder"] and ps.flops["total"] < base.flops["total"]
    assert ps.flops["backbone"] == base.flops["backbone"]


def test_batch_scales_linearly(tiny_reports):
    one = tiny_reports["proscale_tiny_333"]
    two = count_preset("proscale_tiny_333", TINY, batch=2)
    assert all(two.flops[k] == 2 * one.flops[k] for k in ORDER)


def test_independent_of_msda_backend_and_leaves_model_untouched(tiny_reports, monkeypatch):
    torch.manual_seed(0)
    model = proscale.build_model("proscale_tiny_333").eval()
    attns = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    attns[0].backend = "fused"  # the model's own choice of back end is never what is counted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv("PROSCALE_MSDA", "fused")
    # A model with real weights counts the same as the meta-built one (default back end).
    assert count_flops(model, TINY).flops == tiny_reports["proscale_tiny_333"].flops
    for module in model.modules():
        assert "forward" not in module.__dict__  # no patched forward left behind
    assert [m.backend for m in attns] == ["fused"] + ["auto"] * (len(attns) - 1)
    assert all(p.device.type == "cpu" for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_counts_the_real_msda_forward(monkeypatch):
    """The count runs MSDeformAttn.forward itself, with backend "pure": a change to the module's
    arithmetic shows in the count."""
    backends = []
    real_forward = MSDeformAttn.forward

    def forward(self, *args, **kwargs):
        backends.append(self.backend)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MSDeformAttn, "forward", forward)
    report = count_preset("proscale_tiny_333", TINY)
    assert backends == ["pure"] * sum(proscale.get_preset("proscale_tiny_333").encoder.plan)

    def forward_twice(self, *args, **kwargs):  # e.g. a second output projection
        return self.output_proj(forward(self, *args, **kwargs))

    monkeypatch.setattr(MSDeformAttn, "forward", forward_twice)
    d = proscale.get_preset("proscale_tiny_333").encoder.d_model
    extra = sum(layer["tokens"] for layer in report.layers) * d * d
    assert count_preset("proscale_tiny_333", TINY).flops["pixel_decoder.encoder"] == \
        report.flops["pixel_decoder.encoder"] + extra


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit tracing, which fvcore uses, is deprecated
def test_agrees_with_fvcore():
    pytest.importorskip("fvcore")
    from proscale.analysis.flops_fvcore import fvcore_count

    torch.manual_seed(0)
    model = proscale.build_model("proscale_tiny_333").eval()
    ours = count_flops(model, (64, 64)).flops
    theirs = fvcore_count(model, (64, 64))
    for key in ("backbone", "pixel_decoder", "pixel_decoder.encoder"):
        assert theirs[key] == ours[key], key
    # fvcore drops the unused last attention-mask resize from its JIT graph and rounds einsums.
    assert theirs["transformer_decoder"] == pytest.approx(ours["transformer_decoder"], rel=2e-3)


def test_report_json_and_table(r50_reports):
    report = r50_reports["proscale_r50_333"]
    data = json.loads(report.to_json())
    assert data["gflops"]["total"] == pytest.approx(report.gflops["total"])
    assert data["flops"]["pixel_decoder"] == report.flops["pixel_decoder"]
    assert len(data["layers"]) == 9
    table = report.table(r50_reports["m2f_r50"])
    assert "proscale_r50_333 GFLOPs" in table and "m2f_r50/proscale_r50_333" in table
    assert "UNSUPPORTED" not in table


def _flops_parser():
    parser = argparse.ArgumentParser(prog="proscale")
    F.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_table(capsys):
    args = _flops_parser().parse_args(["flops", "--preset", "m2f_tiny", "--size", "128x128", "--vs", "proscale_tiny_333"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| component | m2f_tiny GFLOPs | proscale_tiny_333 GFLOPs | proscale_tiny_333/m2f_tiny |" in out
    assert "**total**" in out


def test_cli_json(capsys):
    args = _flops_parser().parse_args(["flops", "--preset", "m2f_tiny", "--size", "64x96", "--vs", "m2f_tiny",
                                       "--vs-set", "encoder.plan=1,1,1", "--num-classes", "5", "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    a, b = data["reports"]
    assert a["size"] == [64, 96] and b["model_info"]["plan"] == [1, 1, 1]
    assert data["ratio"]["backbone"] == 1.0 and data["ratio"]["pixel_decoder.encoder"] < 1.0


def test_cli_bad_size():
    with pytest.raises(SystemExit):
        _flops_parser().parse_args(["flops", "--size", "800"])


def test_proscale_command(capsys):
    """`proscale flops ...` through the real entry point (needs every registered command to import)."""
    from proscale import cli

    for name in cli.COMMANDS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            pytest.skip(f"{name} is not importable yet: {err}")
    assert cli.main(["flops", "--preset", "m2f_tiny", "--size", "128x128", "--vs", "proscale_tiny_333"]) == 0
    assert "proscale_tiny_333/m2f_tiny" in capsys.readouterr().out
