"""The HTML reports of `proscale quickstart` (OUT/report.html) and `proscale tradeoff`
(OUT/tradeoff.html) opened in a real browser: a toy run of each, loaded from disk in headless
Chromium (Debian's /usr/bin/chromium driven by the playwright package; no browser download), and
checked from the rendered page: every image decoded, one per figure the markdown links, every
markdown table a <table> of the same shape, the key texts visible. A full-page screenshot of each
is saved in the test's tmp dir and copied to /tmp/report_shots/ for a person to look at.

Needs:  apt-get install -y chromium     (Debian's package: /usr/bin/chromium)
        pip install -r requirements-dev.txt   (the pinned playwright; `playwright install` is not needed)
Skips, saying so, when either is missing."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/report_shots")
# Headless Chromium as root in a container: no sandbox, no GPU, nothing fetched from the network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}


def _missing() -> str | None:
    lacks = []
    if not CHROMIUM.is_file():
        lacks.append(f"{CHROMIUM} (Debian: `apt-get install -y chromium`)")
    if importlib.util.find_spec("playwright") is None:
        lacks.append("the playwright Python package (`pip install -r requirements-dev.txt`; no "
                     "`playwright install` needed: the test drives the system Chromium)")
    return ("the browser test needs " + " and ".join(lacks)) if lacks else None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
SEPARATOR = re.compile(r"\|[-:| ]+\|")
NUMBER = re.compile(r"[-+]?\.?\d")  # a cell of a number: 0.039, +2.6 ± 1.8, 0.50x, 64x64, 2 s
WORD = re.compile(r"(?!n/a$)[A-Za-z]")  # a cell of words (n/a stands for a missing number)

# Everything the checks need from the rendered page, read in the page itself.
PAGE_FACTS = """async () => {
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  const visible = e => { const r = e.getBoundingClientRect(), s = getComputedStyle(e);
                         return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'; };
  return {
    title: document.title,
    text: document.body.innerText,
    scrollWidth: document.documentElement.scrollWidth,
    viewportWidth: window.innerWidth,
    images: [...document.images].map(i => ({
      alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
      width: i.getBoundingClientRect().width, dataUri: i.src.startsWith('data:image/png;base64,'),
      visible: visible(i)})),
    tables: [...document.querySelectorAll('table')].map(t => ({
      rows: t.rows.length,
      headerCells: t.rows.length ? t.rows[0].querySelectorAll('th').length : 0,
      cellsPerRow: [...t.rows].map(r => r.cells.length),
      header: t.rows.length ? [...t.rows[0].cells].map(c => c.innerText.trim()) : [],
      body: [...t.rows].slice(1).flatMap(r => [...r.cells].map((c, col) => {
        const range = document.createRange(); range.selectNodeContents(c);
        const lines = new Set([...range.getClientRects()].map(b => Math.round(b.bottom))).size;
        return {col, text: c.innerText.trim(), align: getComputedStyle(c).textAlign, lines};
      })),
      right: t.getBoundingClientRect().right, visible: visible(t)})),
    missing: [...document.querySelectorAll('p')].filter(p => p.textContent.startsWith('(missing')).map(p => p.textContent),
  };
}"""


def markdown_tables(md: str) -> list[list[list[str]]]:
    """The markdown's tables: runs of lines starting with '|', separator rows left out, cells split."""
    tables, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not SEPARATOR.fullmatch(line.strip()):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def plain(cell: str) -> str:
    """A markdown cell as the browser shows it: no ** or `, &nbsp; as a space."""
    return re.sub(r"\s+", " ", cell.replace("**", "").replace("`", "").replace("&nbsp;", " ")).strip()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A fresh profile (--user-data-dir) of its own, the system Chromium, no download.
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=FLAGS,
            headless=True, viewport=VIEWPORT, offline=True)
        yield context
        context.close()


@pytest.fixture(scope="module")
def quickstart_report(tmp_path_factory) -> dict:
    """A toy `proscale quickstart`: both models x 2 seeds, 3 iterations at 64x64."""
    from proscale.quickstart import MODELS, QuickstartConfig, run_quickstart
    from proscale.recipes import SmallRecipe

    out = tmp_path_factory.mktemp("quickstart")
    cfg = QuickstartConfig(out=str(out), image_size=64, num_train=6, num_val=2, seeds=2, workers=2,
                           recipe=SmallRecipe(iterations=3, batch_size=2), latency_warmup=1,
                           latency_repeats=2, latency_rounds=1, latency_large_size=96, num_overlays=2,
                           progress=False)
    result = run_quickstart(cfg)
    return {"md": Path(result["report_md"]), "html": Path(result["report_html"]), "dir": out,
            "names": [n for _, n, _ in MODELS],
            "texts": ["Comparison", "GFLOPs per component", "Latency", "Training", "Predictions on val images",
                      "Settings", "Targets"]}


@pytest.fixture(scope="module")
def tradeoff_report(tmp_path_factory) -> dict:
    """A toy `proscale tradeoff`: two variants x 2 seeds, 2 iterations at 64x64."""
    from proscale.data import generate_synthetic
    from proscale.recipes import SmallRecipe
    from proscale.tradeoff import TradeoffConfig, parse_variants, run_tradeoff

    tmp = tmp_path_factory.mktemp("tradeoff")
    root = generate_synthetic(str(tmp / "data"), num_train=4, num_val=2, image_size=64, seed=0)
    variants = "m2f,p333"
    cfg = TradeoffConfig(data=f"synthetic:{root}", val_data=f"synthetic:{root}", out=str(tmp / "out"),
                         variants=variants, seeds=2, size=64, workers=2, progress=False,
                         recipe=SmallRecipe(iterations=2, batch_size=2))
    result = run_tradeoff(cfg, say=lambda m: None)
    return {"md": Path(result["report_md"]), "html": Path(result["report_html"]), "dir": tmp / "out",
            "names": [v.name for v in parse_variants(variants)],
            "texts": ["PRO-SCALE tradeoff", "Recommended:", f"Recommended: {result['recommendation']['name']}",
                      "What each option changes"]}


# --------------------------------------------------------------------------------------- test
@pytest.mark.parametrize("report", ["quickstart_report", "tradeoff_report"])
def test_report_renders_in_chromium(report, request, browser, tmp_path):
    rep = request.getfixturevalue(report)
    md = rep["md"].read_text()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(rep["html"].resolve().as_uri(), wait_until="load")
    facts = page.evaluate(PAGE_FACTS)

    # Screenshot first, so a failing check below still leaves a picture to look at.
    shot = tmp_path / f"{report}.png"
    page.screenshot(path=str(shot), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SHOTS / shot.name)
    w, h = png_size(shot)
    assert w >= VIEWPORT["width"] - 20 and h > VIEWPORT["height"] / 2

    assert not errors, f"browser errors on {rep['html']}: {errors}"
    assert not facts["missing"], f"images the markdown links but the page lacks: {facts['missing']}"

    # Images: every <img> embedded and decoded, displayed; at least one per figure the markdown links.
    links = IMAGE_LINK.findall(md)
    assert links, f"{rep['md']} links no figure"
    images = facts["images"]
    assert len(images) >= len(links), (links, images)
    for img in images:
        assert img["dataUri"], f"<img alt={img['alt']!r}> is not embedded as a data URI"
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, f"not loaded: {img}"
        assert img["visible"] and img["width"] > 100, f"not shown at a readable size: {img}"
    for alt, target in links:
        assert any(i["alt"] == alt for i in images), f"no <img alt={alt!r}> for ![{alt}]({target})"
        assert (rep["dir"] / target).is_file()

    # Tables: each markdown table a <table> with as many rows and header cells, every row complete.
    md_tables = markdown_tables(md)
    assert md_tables, f"{rep['md']} has no table"
    tables = facts["tables"]
    assert len(tables) == len(md_tables), f"{len(md_tables)} markdown tables, {len(tables)} <table>s"
    for k, (mt, t) in enumerate(zip(md_tables, tables)):
        where = f"table {k + 1} of {rep['html'].name} (header {mt[0]})"
        assert t["rows"] == len(mt), f"{where}: {len(mt)} markdown rows, {t['rows']} <tr>"
        assert t["headerCells"] == len(mt[0]), f"{where}: {len(mt[0])} header cells, {t['headerCells']} <th>"
        assert t["cellsPerRow"] == [len(mt[0])] * len(mt), f"{where}: cells per row {t['cellsPerRow']}"
        assert t["header"] == [plain(c) for c in mt[0]], f"{where}: rendered header {t['header']}"
        assert t["visible"], f"{where} is not displayed"
        # Numbers right-aligned on one line; row labels and words left-aligned.
        for cell in t["body"]:
            if cell["col"] > 0 and NUMBER.match(cell["text"]):
                assert cell["align"] == "right" and cell["lines"] == 1, f"{where}: number cell {cell}"
            elif cell["col"] == 0 or WORD.match(cell["text"]):
                assert cell["align"] in ("left", "start"), f"{where}: text cell {cell}"
    assert facts["scrollWidth"] <= facts["viewportWidth"], "the page is wider than the window"

    # Key texts, as rendered (innerText leaves out what is not displayed).
    text = facts["text"]
    for key in rep["names"] + rep["texts"]:
        assert key in text, f"{key!r} not shown on {rep['html'].name}"
    for name in rep["names"]:
        assert page.get_by_role("cell", name=name, exact=True).first.is_visible(), f"no table cell {name!r}"
    assert "**" not in text and "![" not in text, "markdown syntax left unrendered"
    page.close()
