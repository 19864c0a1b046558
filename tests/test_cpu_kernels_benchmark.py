"""benchmarks/cpu_kernels.py: each CPU inference fast path gives the standard operator's values."""
import sys
from pathlib import Path

import pytest

from proscale.kernels.linear import onednn_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_every_fast_path_matches_its_standard_operator():
    from cpu_kernels import run

    rows = run(repeats=1, tokens=300, hw=(12, 17), image_size=(96, 128))
    assert [r["case"] for r in rows][-1] == "R50 backbone" and len(rows) == 6
    for r in rows:
        assert r["max_rel_diff"] < 1e-4, r
        assert r["standard"] > 0 and r["fast"] > 0


def test_bf16_rows_compare_the_same_layers():
    from cpu_kernels import bf16_cases, run

    rows = run(repeats=1, cases_fn=bf16_cases, tokens=200)
    assert len(rows) == 2
    for r in rows:  # bf16 rounding (8 bits of mantissa), not another function
        assert 1e-4 < r["max_rel_diff"] < 3e-2, r
