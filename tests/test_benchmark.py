"""`proscale bench` machinery (timings are never asserted: benchmarks report, tests check plumbing)."""
import json

import pytest
import torch

from proscale.analysis.benchmark import run_benchmark
from proscale.analysis.memory import peak_memory_bytes


def test_peak_memory_counts_live_tensors():
    def fn():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more while a lives
        del a
        c = b + 1  # a freed first: still 8 MB at the peak
        return c.sum()

    assert peak_memory_bytes(fn) == 8_000_000 + 4  # + the 4-byte sum


def test_bench_side_by_side_table_and_json(tmp_path):
    report = run_benchmark(["m2f_tiny", "proscale_tiny_333"], size=(64, 64), batch=1, warmup=0, repeats=2,
                           num_classes=8, threads=1)
    assert report.columns == ["m2f_tiny", "proscale_tiny_333"]
    assert set(report.rows) == {"pixel_decoder/infer", "pixel_decoder/train", "model/infer", "model/train"}
    for cells in report.rows.values():
        for t in cells.values():
            assert t.median_ms > 0 and t.p10_ms <= t.median_ms <= t.p90_ms and t.peak_mb > 0
    table = report.table()
    assert "proscale_tiny_333/m2f_tiny" in table and table.count("\n") == 6
    data = json.loads(report.to_json())
    assert data["rows"]["model/infer"]["m2f_tiny"]["runs"] == 2


def test_hf_peer_column_runs_same_paths():
    import pytest

    pytest.importorskip("transformers")
    report = run_benchmark(["m2f_tiny"], size=(64, 64), batch=1, warmup=0, repeats=1, num_classes=8, threads=1,
                           peer="hf", memory=False, modes=("infer",))
    assert report.columns == ["m2f_tiny", "hf"]
    assert all("hf" in cells for cells in report.rows.values())


def test_hf_peer_refuses_proscale_config():
    import pytest

    pytest.importorskip("transformers")
    import proscale
    from proscale.analysis.hf_peer import hf_config_from

    with pytest.raises(ValueError, match="baseline encoder"):
        hf_config_from(proscale.get_preset("proscale_tiny_333"))


def test_throughput_rows_per_batch_size():
    from proscale.analysis.benchmark import run_throughput, throughput_table

    result = run_throughput(["proscale_tiny_333"], size=(64, 64), batches=(1, 2), warmup=0, repeats=1, num_classes=8,
                            threads=1)
    rows = result["rows"]
    assert set(rows) == {"proscale_tiny_333 batch 1", "proscale_tiny_333 batch 2"}
    for key, r in rows.items():
        b = int(key.rsplit(" ", 1)[1])
        assert r["images_per_s"] == pytest.approx(1000 * b / r["ms"])
    assert result["compile_s"] == {}
    assert "images/s" in throughput_table(result, "t")
