"""benchmarks/upgrade.py's report is computed from the runs: the table and the findings."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import upgrade  # noqa: E402


def _runs(pqs, minutes=1.0):
    return [{"seed": s, "metrics": {"PQ": pq, "PQ_th": pq, "PQ_st": pq, "AP": pq, "mIoU": pq},
             "train_seconds": 60 * minutes} for s, pq in enumerate(pqs)]


def test_findings_follow_the_numbers():
    results = {"m2f": _runs([90.0, 91.0]), "scratch": _runs([90.5, 91.5], 4.0),
               "scratch-1/4": _runs([85.0, 86.0]), "warm": _runs([89.5, 90.0]), "warm-depth": _runs([88.0, 89.5])}
    its = {"m2f": 800, "scratch": 800, "scratch-1/4": 200, "warm": 200, "warm-depth": 200}
    lines = upgrade.findings(results, its)
    assert lines[0].startswith("Target (PQ within 1 of Mask2Former after 200 of its 800 iterations): met by warm;")
    assert "not by scratch-1/4, warm-depth" in lines[0]
    assert "scratch-1/4: -5.0 ± 0.0" in lines[1] and "warm: -0.8 ± 0.2" in lines[1]
    assert lines[-1].startswith("Best upgrade: warm (-0.8 PQ")
    table = upgrade.table(results, its)
    assert "| warm | 200 | 89.8 ± 0.4 |" in table and "-0.8 ± 0.2 (se)" in table
