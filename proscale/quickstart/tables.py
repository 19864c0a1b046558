"""The report's numbers: the comparison rows of both models (metrics over seeds), the table
cells and the goals."""
from __future__ import annotations

import math

from proscale.tradeoff.summary import Stat

# The goals the quickstart states and checks (never relaxed here): both models learn, and
# PRO-SCALE matches Mask2Former within these margins (means over seeds) at about half the cost.
TARGET_PQ = 60.0
TARGET_PQ_GAP = 1.0
TARGET_AP_GAP = 2.0
TARGET_PIXEL_DECODER_RATIO = 0.55
METRIC_NAMES = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")

TABLE_HEAD = ["model", "encoder GFLOPs", "total GFLOPs", "encoder ms", "model ms", *METRIC_NAMES]


def comparison_rows(models, evals: dict, measure: dict) -> list[dict]:
    """One dict per model of `models` ((key, name, preset) tuples): costs, and each metric as a
    Stat over the model's seeds (evals[key]: its runs' results)."""
    rows = []
    for key, name, preset in models:
        g = measure["flops"][key]["gflops"]
        lat = measure["latency_ms"]
        runs = [r for r in evals.get(key, []) if r.get("metrics")]
        rows.append({
            "key": key, "name": name, "preset": preset,
            "encoder_gflops": g["pixel_decoder"], "total_gflops": g["total"],
            "encoder_ms": lat["pixel_decoder/infer"][key]["median"], "model_ms": lat["model/infer"][key]["median"],
            **{m: Stat([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in METRIC_NAMES},
            "seeds": [r["seed"] for r in runs],
        })
    return rows


def fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a, b) -> str:
    """b / a as "0.50x" (cost of the second model against the first)."""
    return "n/a" if a is None or b is None or a == 0 else f"{b / a:.2f}x"


def difference(a: Stat, b: Stat) -> str:
    """mean(b) - mean(a) in points, ± the standard error of that difference."""
    if not a.n or not b.n:
        return "n/a"
    if a.n == 1 and b.n == 1:
        return f"{b.mean - a.mean:+.1f}"
    return f"{b.mean - a.mean:+.1f} ± {math.hypot(a.sem, b.sem):.1f}"


def table_cells(rows: list[dict]) -> list[list[str]]:
    """The comparison table as text cells: one line per model (metrics: mean ± std over seeds),
    then PRO-SCALE vs the baseline (ratios for cost; differences of the means in points, ± their
    standard error)."""
    d = 2 if max(r["total_gflops"] for r in rows) >= 10 else 3  # GFLOPs digits
    lines = []
    for r in rows:
        lines.append([r["name"], fmt(r["encoder_gflops"], d), fmt(r["total_gflops"], d), fmt(r["encoder_ms"], 2),
                      fmt(r["model_ms"], 2), *[r[m].text() for m in METRIC_NAMES]])
    base = rows[0]
    for r in rows[1:]:
        lines.append([f"{r['name']} / {base['name']}",
                      ratio(base["encoder_gflops"], r["encoder_gflops"]),
                      ratio(base["total_gflops"], r["total_gflops"]),
                      ratio(base["encoder_ms"], r["encoder_ms"]), ratio(base["model_ms"], r["model_ms"]),
                      *[difference(base[m], r[m]) for m in METRIC_NAMES]])
    return lines


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def seed_cells(rows: list[dict], evals: dict) -> tuple[list[str], list[list[str]]]:
    """Every training: model, seed, its metrics and training time."""
    head = ["model", "seed", *METRIC_NAMES, "iterations", "training time"]
    lines = []
    for r in rows:
        for run in evals.get(r["key"], []):
            m = run.get("metrics") or {}
            lines.append([r["name"], str(run["seed"]), *[fmt(m.get(k)) for k in METRIC_NAMES],
                          str(run.get("iteration", "n/a")), duration(run.get("train_seconds"))])
    return head, lines


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(what, measured, met) for each goal of the quickstart (means over seeds)."""
    base, ours = rows[0], rows[-1]
    out = []
    for r in rows:
        pq = r["PQ"]
        out.append((f"{r['name']}: PQ >= {TARGET_PQ:g}", pq.text(), None if not pq.n else pq.mean >= TARGET_PQ))
    for metric, margin in (("PQ", TARGET_PQ_GAP), ("AP", TARGET_AP_GAP)):
        a, b = base[metric], ours[metric]
        ok = None if not (a.n and b.n) else b.mean >= a.mean - margin
        out.append((f"{ours['name']} within {margin:g} {metric} of {base['name']} (means over {b.n} seeds)",
                    difference(a, b), ok))
    share = ours["encoder_gflops"] / base["encoder_gflops"]
    out.append((f"{ours['name']} pixel-decoder GFLOPs <= {TARGET_PIXEL_DECODER_RATIO:.0%} of {base['name']}'s",
                f"{share:.1%}", share <= TARGET_PIXEL_DECODER_RATIO))
    return out
