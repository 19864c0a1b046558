"""The tradeoff report: OUT/tradeoff.md, OUT/tradeoff.html, OUT/tradeoff.png, OUT/summary.json."""
from __future__ import annotations

import datetime
import math
import shlex
from pathlib import Path

from proscale.fileio import atomic_write, write_json
from proscale.report_html import markdown_table, markdown_to_html, text_table
from proscale.tradeoff.summary import DETAIL, METRICS, Row, gap_explanations, recommend

PLOT_METRICS = ("PQ", "AP", "mIoU")


def _cell(row: Row, metric: str) -> str:
    stat = row.metrics.get(metric)
    return stat.text("-") if stat else "-"


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    base = rows[0]
    head = ["variant", "pixel decoder GFLOPs", "vs baseline", "total GFLOPs", "pixel decoder ms",
            *[f"{m} (mean ± std)" for m in METRICS], "seeds", "Pareto (PQ)"]
    lines = []
    for r in rows:
        pd, pd0 = r.gflops.get("pixel_decoder", math.nan), base.gflops.get("pixel_decoder", math.nan)
        ms = r.latency_ms.get("pixel_decoder_ms")
        n = max((s.n for s in r.metrics.values()), default=0)
        lines.append([r.name, f"{pd:.3f}", f"{pd / pd0:.2f}x", f"{r.gflops.get('total', math.nan):.3f}",
                      f"{ms:.1f}" if ms is not None else "-", *[_cell(r, m) for m in METRICS], str(n),
                      "yes" if r.pareto else ""])
    return head, lines


def detail_table(rows: list[Row]) -> tuple[list[str], list[list[str]]] | None:
    """SQ, RQ, AP50, AP75 (mean ± std) per variant, when the runs have them."""
    if not any(r.metrics.get(m) for r in rows for m in DETAIL):
        return None
    return (["variant", *[f"{m} (mean ± std)" for m in DETAIL]],
            [[r.name, *[_cell(r, m) for m in DETAIL]] for r in rows])


def plot(rows: list[Row], results: list[dict], path: Path) -> Path:
    """Pixel-decoder GFLOPs against PQ / AP / mIoU: mean ± std per variant, every seed as a dot,
    the Pareto front (by PQ) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5.2 * len(PLOT_METRICS), 4.4), dpi=100)
    colors = plt.get_cmap("tab10")
    for ax, metric in zip(axes, PLOT_METRICS):
        for i, r in enumerate(rows):
            stat = r.metrics.get(metric)
            if not stat:
                continue
            x = r.gflops["pixel_decoder"]
            seeds = [res["metrics"][metric] for res in results if res["variant"] == r.key and metric in
                     res.get("metrics", {})]
            ax.scatter([x] * len(seeds), seeds, s=10, color=colors(i % 10), alpha=0.5)
            ax.errorbar([x], [stat.mean], yerr=[stat.std], fmt="*" if r.pareto and metric == "PQ" else "o",
                        ms=11 if r.pareto and metric == "PQ" else 6, color=colors(i % 10), capsize=3, label=r.name)
        if metric == "PQ":
            front = sorted((r for r in rows if r.pareto), key=lambda r: r.gflops["pixel_decoder"])
            ax.plot([r.gflops["pixel_decoder"] for r in front], [r.mean("PQ") for r in front], "k--", lw=1,
                    label="Pareto front")
        ax.set_xlabel("pixel decoder GFLOPs")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs cost: mean ± std over seeds (dots: single seeds; star: Pareto-optimal by PQ)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def command_line(cfg) -> str:
    """The `proscale tradeoff` command that reproduces this report (from its config)."""
    from proscale.recipes import SmallRecipe

    default = SmallRecipe()
    recipe = [f"{k}={v}" for k, v in vars(cfg.recipe).items() if getattr(default, k) != v]
    args = ["proscale", "tradeoff", "--data", cfg.data, "--val-data", cfg.val_data, "--out", cfg.out,
            "--preset", cfg.preset, "--variants", cfg.variants, "--seeds", str(cfg.seeds), "--size", str(cfg.size),
            *recipe, *cfg.overrides]
    return " ".join(shlex.quote(a) for a in args)


def write_report(cfg, rows: list[Row], results: list[dict]) -> dict:
    out = Path(cfg.out)
    head, lines = table(rows)
    rec = recommend(rows, cfg.tolerance)
    explanations = gap_explanations(rows)
    png = plot(rows, results, out / "tradeoff.png")
    command = command_line(cfg)
    seeds_info = f"{cfg.seeds} seed{'s' if cfg.seeds > 1 else ''} per variant"
    md = "\n".join([
        "# PRO-SCALE tradeoff",
        "",
        f"Data: `{cfg.data}` (val: `{cfg.val_data}`); base preset `{cfg.preset}`, {cfg.size} px, {seeds_info}, "
        f"{cfg.recipe.iterations} iterations of batch {cfg.recipe.batch_size} each (the `small` recipe, proscale/recipes/small.yaml"
        + (f", with {' '.join(cfg.overrides)}" if cfg.overrides else "") + f"). Written {datetime.date.today()}.",
        "",
        f"Command: `{command}`",
        "",
        markdown_table(head, lines),
        "",
        *(["Where the differences come from: PQ = SQ (segmentation quality, the IoU of matched segments) x RQ "
           "(recognition quality, F1 of finding them); AP50 / AP75: mask AP at IoU 0.5 / 0.75.", "",
           markdown_table(*detail_table(rows)), ""] if detail_table(rows) else []),
        "Metrics are means over seeds ± their sample standard deviation; GFLOPs are counted at the training size "
        "(fvcore's convention, batch 1); latency is the median of interleaved runs of the pixel decoder, one thread, "
        "batch 1, on the machine that ran this report.",
        "",
        f"**Recommended: {rec['name']}**: {rec['reason']}.",
        "",
        "## What each option changes (from these runs)",
        "",
        *[f"- {line}" for line in explanations],
        "",
        "![accuracy vs cost](tradeoff.png)",
        "",
    ])
    atomic_write(out / "tradeoff.md", md)
    html = markdown_to_html(md, out, {png: "accuracy vs cost"}, "PRO-SCALE tradeoff")
    atomic_write(out / "tradeoff.html", html)
    summary = {"rows": [{"key": r.key, "name": r.name, "gflops": r.gflops, "latency_ms": r.latency_ms,
                         "pareto": r.pareto, "metrics": {m: s.as_dict() for m, s in r.metrics.items()}}
                        for r in rows], "recommendation": rec, "explanations": explanations}
    write_json(out / "summary.json", summary)
    return {"rows": rows, "recommendation": rec, "explanations": explanations, "table": text_table(head, lines),
            "report_md": str(out / "tradeoff.md"), "report_html": str(out / "tradeoff.html"), "plot": str(png)}
