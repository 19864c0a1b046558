"""Tables as markdown or fixed-width text, and markdown -> one self-contained HTML page, for the
reports of `proscale quickstart` and `proscale tradeoff`: headings, paragraphs, lists, tables,
`code`, **bold**, and images embedded as data URIs (the page can be mailed or opened anywhere on
its own). Only the forms those reports use; not a general markdown renderer."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f2f2f2}td.num{text-align:right;white-space:nowrap}tr:nth-child(even){background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code{background:#f4f4f4;padding:0 3px}"""


def markdown_table(head: list[str], lines: list[list[str]]) -> str:
    """Columns of numbers right-aligned, the others left-aligned (as the HTML page shows them)."""
    numeric = numeric_columns([head] + lines)
    out = ["| " + " | ".join(head) + " |", "|" + "".join("---:|" if n else "---|" for n in numeric)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def text_table(head: list[str], lines: list[list[str]]) -> str:
    """Fixed-width table for the terminal."""
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in lines])


def inline(text: str) -> str:
    """The few inline markdown forms the report uses: `code` and **bold** (and &nbsp; kept)."""
    text = html.escape(text, quote=False).replace("&amp;nbsp;", "&nbsp;")
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def embedded_image(path: Path, alt: str) -> str:
    """An <img> tag carrying the PNG at `path` as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


NUMBER = re.compile(r"[-+]?\.?\d")  # how a number cell starts: 0.039, +2.6 ± 1.8, 0.50x, 64x64, 2 s
NOT_A_NUMBER = {"", "-", "n/a", "nan"}  # placeholders that may stand in a column of numbers


def numeric_columns(rows: list[list[str]]) -> list[bool]:
    """Per column: True when every body cell is a number (or a placeholder) and one at least is a
    number. Such columns are right-aligned and kept on one line, the others (and the first, the row
    labels) left-aligned."""
    width = max(len(r) for r in rows)

    def is_numeric(col):
        cells = [r[col].replace("**", "").strip() for r in rows[1:] if col < len(r)]
        return (col > 0 and any(NUMBER.match(c) for c in cells)
                and all(NUMBER.match(c) or c.lower() in NOT_A_NUMBER for c in cells))

    return [is_numeric(col) for col in range(width)]


def markdown_to_html(md_text: str, out: Path, images: dict[Path, str], title: str) -> str:
    """The page of `md_text`, whose image links are relative to the folder `out`; `images`: path
    -> alt text of the images to embed (others are read from `out` when they exist)."""
    by_rel = {p.relative_to(out).as_posix(): (p, alt) for p, alt in images.items()}
    body, table, items = [], [], []

    def flush():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-:| ]+\|", r)]
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            tds = ["<td class='num'>" if n else "<td>" for n in numeric_columns(cells)]
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"{tds[i]}{inline(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                                  for r in cells[1:])
                        + "</table>")
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if m:
            path, alt = by_rel.get(m.group(2), (out / m.group(2), m.group(1)))
            body.append(embedded_image(path, alt) if path.is_file() else f"<p>(missing {html.escape(m.group(2))})</p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
