"""`proscale bench --profile`: per-component times beside GFLOPs (timings are never asserted)."""
import pytest
import torch

import proscale
from proscale.analysis.profile import LABELS, MODEL_PARTS, PD_PARTS, profile_models


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    models = {n: proscale.build_model(n, num_classes=8).eval() for n in ("m2f_tiny", "proscale_tiny_333")}
    images = torch.randint(0, 256, (1, 3, 64, 96)).float()
    rep = profile_models(models, images, warmup=0, repeats=2)
    rep.models = models  # for the tests below
    return rep


def test_every_component_timed_and_parts_add_up(report):
    for name in report.columns:
        ms = report.ms[name]
        assert set(ms) == set(LABELS)
        assert ms["total"] > 0 and ms["backbone"] > 0 and ms["transformer_decoder"] > 0
        assert ms["pixel_decoder.input_proj"] > 0 and ms["pixel_decoder.encoder.stage3"] > 0
    # The baseline has no stage-1/2 layers and no TRC; PRO-SCALE has all three.
    base, ps = report.ms["m2f_tiny"], report.ms["proscale_tiny_333"]
    assert base["pixel_decoder.encoder.stage1"] == base["pixel_decoder.trc"] == 0
    assert ps["pixel_decoder.encoder.stage1"] > 0 and ps["pixel_decoder.encoder.stage2"] > 0 and ps["pixel_decoder.trc"] > 0


def test_gflops_are_the_flop_counts_of_the_same_components(report):
    from proscale.analysis.flops import count_flops

    for name, model in report.models.items():
        counted = count_flops(model, (64, 96)).gflops
        for key in PD_PARTS + MODEL_PARTS + ("total",):
            assert report.gflops[name][key] == pytest.approx(counted[key])


def test_above_flops_assigns_exactly_the_gap(report):
    """Summed over a group's rows, 'ms above FLOPs' = time - FLOP ratio x baseline time."""
    base, ps = "m2f_tiny", "proscale_tiny_333"
    for group, parts in (("pixel_decoder", PD_PARTS + ("pixel_decoder.other",)), ("total", MODEL_PARTS + ("other",))):
        above = report.above_flops(ps, group)
        ratio = report.gflops[ps][group] / report.gflops[base][group]
        gap = report.ms[ps][group] - ratio * report.ms[base][group]
        assert above[group] == pytest.approx(gap, abs=1e-6)
        assert sum(above[k] for k in parts) == pytest.approx(gap, abs=1e-6)
    # the baseline against itself: no gap at all
    assert report.above_flops(base, "total")["total"] == pytest.approx(0, abs=1e-6)


def test_hooks_removed_and_table(report):
    for model in report.models.values():
        assert "forward_fpn" not in vars(model.pixel_decoder)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    table = report.table()
    assert table.count("\n") == len(LABELS) + 2
    assert "proscale_tiny_333 ms above FLOPs" in table and "encoder stage 2" in table


def test_bench_cli_profile_section(tmp_path, capsys):
    import json

    from proscale.cli import main

    path = tmp_path / "p.json"
    assert main(["bench", "--preset", "m2f_tiny", "--vs", "proscale_tiny_333", "--size", "64x64", "--num-classes", "8",
                 "--profile", "--component", "none", "--repeats", "1", "--warmup", "0", "--json", str(path)]) == 0
    assert "ms above FLOPs" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["profile"]["columns"] == ["m2f_tiny", "proscale_tiny_333"]


def test_profile_refuses_a_detector():
    detector = proscale.build_model("ddetr_nano", num_classes=4).eval()
    with pytest.raises(TypeError, match="MaskFormer"):
        profile_models({"d": detector}, torch.zeros(1, 3, 64, 64), warmup=0, repeats=1)


def test_round_ratios_pair_the_rounds(report):
    """Per-round ratios: one per round, each the PRO-SCALE time over the baseline's of that
    round (they took turns), printed as a range under the table."""
    ratios = report.round_ratios["proscale_tiny_333"]
    assert set(ratios) == {"pixel_decoder", "total"}
    for group, values in ratios.items():
        assert len(values) == report.repeats and all(v > 0 for v in values)
    line = report.spread()
    assert line.startswith("proscale_tiny_333/m2f_tiny time ratio per round") and "pixel decoder" in line
