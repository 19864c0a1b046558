"""FLOP counting of the detector (proscale.analysis.detr_flops) and `proscale flops` with
detection presets: every encoder layer's count equals tokens x the analytic per-token formula,
components sum to the total, PRO-SCALE changes only the encoder, and the table."""
from __future__ import annotations

import pytest

from proscale.analysis.detr_flops import detr_components
from proscale.analysis.flop_counter import encoder_layer_flops_per_token
from proscale.analysis.flops import count_preset
from proscale.cli import main as cli

SIZE = (800, 1333)  # padded to 800x1344: levels (13x21, 25x42, 50x84, 100x168), coarse to fine
TOKENS = [13 * 21, 25 * 42, 50 * 84, 100 * 168]


@pytest.fixture(scope="module")
def reports():
    return {p: count_preset(p, SIZE, num_classes=80) for p in
            ("ddetr_r50", "proscale_ddetr_r50_2222", "proscale_ddetr_r50_2220", "ddetr_r50_twostage_refine")}


def test_encoder_layers_match_the_analytic_formula(reports):
    for name, plan in (("ddetr_r50", (0, 0, 0, 6)), ("proscale_ddetr_r50_2222", (2, 2, 2, 2))):
        r = reports[name]
        assert r.model_info["tokens"] == TOKENS and r.model_info["plan"] == list(plan)
        assert [lay["stage"] for lay in r.layers] == [s + 1 for s, n in enumerate(plan) for _ in range(n)]
        for lay in r.layers:
            per_token = encoder_layer_flops_per_token(256, lay["stage"], 8, 4, 1024)
            assert lay["flops"] == lay["analytic"] == sum(TOKENS[:lay["stage"]]) * per_token
        stages = sum(r.flops[f"encoder.stage{s}"] for s in range(1, 5))
        assert r.flops["encoder"] == stages + r.flops["encoder.trc"]


def test_components_sum_and_proscale_changes_only_the_encoder(reports):
    base, pro = reports["ddetr_r50"], reports["proscale_ddetr_r50_2222"]
    for r in reports.values():
        leaves = [k for k in detr_components(4) if k not in ("encoder", "total")]
        assert r.flops["total"] == sum(r.flops[k] for k in leaves) > 0
        assert not r.unsupported
    for key in ("backbone", "input_proj", "extra_levels", "decoder", "heads"):
        assert base.flops[key] == pro.flops[key] > 0, key
    assert pro.flops["encoder.trc"] > 0 == base.flops["encoder.trc"]
    assert 0.4 < pro.flops["encoder"] / base.flops["encoder"] < 0.45  # (2,2,2,2): 2 of 6 full layers + cheap ones
    assert 0.4 < base.flops["encoder"] / base.flops["total"] < 0.6  # the encoder is about half the detector
    # (2, 2, 2, 0): the stride-8 tokens go straight to the decoder's memory.
    assert reports["proscale_ddetr_r50_2220"].flops["encoder.stage4"] == 0


def test_two_stage_proposals_are_booked(reports):
    r = reports["ddetr_r50_twostage_refine"]
    # enc_output (d x d), the class head (d x 80) and the box MLP (2 d x d + d x 4) on every token.
    per_token = 256 * 256 + 256 * 80 + 2 * 256 * 256 + 256 * 4
    assert r.flops["two_stage"] >= sum(TOKENS) * per_token
    assert r.flops["encoder"] == reports["ddetr_r50"].flops["encoder"]


def test_flops_command_prints_the_detector_table(capsys):
    assert cli(["flops", "--preset", "ddetr_nano", "--vs", "proscale_ddetr_nano_2222", "--size", "128x128"]) == 0
    out = capsys.readouterr().out
    assert "| encoder |" in out and "stage 4 (strides 64+32+16+8)" in out and "proscale_ddetr_nano_2222/ddetr_nano" in out
    assert "% of the total" in out
    assert cli(["flops", "--preset", "ddetr_nano", "--vs", "m2f_nano", "--size", "128x128"]) == 2


def test_bench_times_the_detector_encoder_and_model():
    from proscale.analysis.benchmark import run_benchmark

    report = run_benchmark(["ddetr_nano", "proscale_ddetr_nano_2222"], size=(96, 96), warmup=0, repeats=1,
                           memory=False, num_classes=8, threads=1)
    assert report.columns == ["ddetr_nano", "proscale_ddetr_nano_2222"]
    assert list(report.rows) == ["encoder/infer", "encoder/train", "model/infer", "model/train"]
    for cells in report.rows.values():
        assert all(t.median_ms > 0 for t in cells.values()) and len(cells) == 2
    assert "encoder/infer" in report.table()
