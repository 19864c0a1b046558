"""From per-seed results to what a user decides with: mean and spread per variant, the Pareto
front of cost against accuracy, a recommendation, and the explanation of each variant's gap to
the baseline, all computed from the runs (nothing here is typed in).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from proscale.tradeoff.variants import with_option

METRICS = ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")
# The parts that say where a PQ / AP difference comes from: segmentation quality (SQ: IoU of the
# matched segments) or recognition (RQ: finding them), and AP at a loose and a strict IoU.
DETAIL = ("SQ", "RQ", "AP50", "AP75")


@dataclass
class Stat:
    """One metric over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def sem(self) -> float:
        """Standard error of the mean."""
        return self.std / math.sqrt(self.n) if self.n > 1 else 0.0

    def text(self, missing: str = "n/a") -> str:
        """"mean ± std" with one decimal (the mean alone for one seed)."""
        if not self.n:
            return missing
        return f"{self.mean:.1f} ± {self.std:.1f}" if self.n > 1 else f"{self.mean:.1f}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "min": min(self.values, default=math.nan),
                "max": max(self.values, default=math.nan), "n": self.n, "values": self.values}


@dataclass
class Row:
    """One variant: its costs and its metrics over seeds."""

    key: str
    name: str
    gflops: dict  # component -> GFLOPs at the training size ("pixel_decoder", "total", ...)
    metrics: dict[str, Stat] = field(default_factory=dict)
    latency_ms: dict = field(default_factory=dict)  # component -> median ms (when measured)
    pareto: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.key == "m2f"

    def mean(self, metric: str) -> float:
        stat = self.metrics.get(metric)
        return stat.mean if stat else math.nan


def build_rows(variants, results: list[dict], gflops: dict[str, dict], latency: dict[str, dict] | None = None
               ) -> list[Row]:
    """Rows in the order of `variants` from the runs' results (those with metrics)."""
    rows = []
    for v in variants:
        runs = [r for r in results if r["variant"] == v.key and r.get("metrics")]
        stats = {m: Stat([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in METRICS + DETAIL}
        rows.append(Row(v.key, v.name, gflops.get(v.key, {}), {m: s for m, s in stats.items() if s.n},
                        (latency or {}).get(v.key, {})))
    mark_pareto(rows)
    return rows


def mark_pareto(rows: list[Row], metric: str = "PQ", cost: str = "pixel_decoder") -> None:
    """A row is on the front when no other row is at most as costly and strictly more accurate
    (mean over seeds), or strictly cheaper and at least as accurate."""
    for r in rows:
        c, a = r.gflops.get(cost, math.nan), r.mean(metric)
        r.pareto = not math.isnan(a) and not any(
            (o.gflops.get(cost, math.nan) <= c and o.mean(metric) > a)
            or (o.gflops.get(cost, math.nan) < c and o.mean(metric) >= a)
            for o in rows if o is not r and not math.isnan(o.mean(metric)))


def recommend(rows: list[Row], tolerance: float = 1.0, metric: str = "PQ", cost: str = "pixel_decoder") -> dict:
    """The cheapest variant whose mean `metric` is within `tolerance` points of the baseline's
    (the first row); when none is, the most accurate of the others. Returns {"key", "name",
    "reason"}."""
    base = rows[0]
    others = [r for r in rows[1:] if not math.isnan(r.mean(metric))]
    if not others or math.isnan(base.mean(metric)):
        return {"key": base.key, "name": base.name, "reason": "no other variant finished"}
    ok = [r for r in others if r.mean(metric) >= base.mean(metric) - tolerance]
    if ok:
        best = min(ok, key=lambda r: (r.gflops.get(cost, math.inf), -r.mean(metric)))
        ratio = best.gflops.get(cost, math.nan) / base.gflops.get(cost, math.nan)
        return {"key": best.key, "name": best.name,
                "reason": f"the cheapest within {tolerance:g} {metric} of {base.name} "
                          f"({best.mean(metric):.1f} vs {base.mean(metric):.1f}) at {ratio:.2f}x its "
                          f"{cost.replace('_', ' ')} GFLOPs"}
    best = max(others, key=lambda r: r.mean(metric))
    return {"key": best.key, "name": best.name,
            "reason": f"no variant is within {tolerance:g} {metric} of {base.name}; this one comes closest "
                      f"({best.mean(metric) - base.mean(metric):+.1f})"}


def gap_explanations(rows: list[Row], metric: str = "PQ") -> list[str]:
    """For every variant, its gap to the baseline, and for each pair of variants that differ in
    exactly one option (the output block, TRC, temperature, RESIDUAL), what that option changes:
    sentences generated from the table."""
    base = rows[0]
    by_key = {r.key: r for r in rows}
    lines = []
    for r in rows[1:]:
        gap = r.mean(metric) - base.mean(metric)
        if math.isnan(gap):
            continue
        spread = math.hypot(r.metrics[metric].sem, base.metrics[metric].sem)
        verdict = "within the seed noise" if abs(gap) <= 2 * spread else ("better" if gap > 0 else "worse")
        parts = [f"{m} {r.mean(m) - base.mean(m):+.1f}" for m in DETAIL
                 if not math.isnan(r.mean(m) - base.mean(m))]
        lines.append(f"{r.name}: {gap:+.1f} {metric} against {base.name} (standard error of the difference "
                     f"{spread:.1f}: {verdict})" + (f"; {', '.join(parts)}" if parts else "") + ".")
    for option, label in (("-conv", "the 3x3 conv instead of LPE"), ("-notrc", "no TRC"), ("-res", "RESIDUAL")):
        for r in rows:
            if r.is_baseline or option in r.key:
                continue
            twin = by_key.get(with_option(r.key, option))
            if twin is None or math.isnan(twin.mean(metric)) or math.isnan(r.mean(metric)):
                continue
            delta = twin.mean(metric) - r.mean(metric)
            lines.append(f"{label}, from {r.name}: {delta:+.1f} {metric} ({r.mean(metric):.1f} -> "
                         f"{twin.mean(metric):.1f}).")
    return lines
