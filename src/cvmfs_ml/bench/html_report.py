"""``report.html``: the run's summary and plots on one self-contained page.

The tables are written once, as Markdown (:func:`cvmfs_ml.bench.report.write_markdown`); this
module renders that Markdown (the subset it uses: headings, bullet lists, pipe tables, bold and
code spans) and embeds the plots as data URIs, so the page can be mailed or attached to a CI
run as one file and opens in any browser without a server or JavaScript.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["markdown_to_html", "write_html_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 .2em; } img { max-width: 100%; margin: .5em 0; }
"""


# A link the report makes to a file beside it: a relative path of plain characters only (no
# scheme, no "..", no quotes), so text from a results file cannot smuggle in a URL.
_LINK = re.compile(r"\[([^\]]+)\]\(((?!\.\./)[A-Za-z0-9_][A-Za-z0-9_./-]*)\)")


def _inline(text: str) -> str:
    """Escape, then render ``code``, **bold** and [links](to/a/file/beside/the/report)."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return _LINK.sub(
        lambda m: m.group(0) if ".." in m.group(2).split("/")
        else f'<a href="{m.group(2)}">{m.group(1)}</a>', out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: Sequence[str]) -> str:
    head, body = _cells(lines[0]), [_cells(row) for row in lines[2:]]
    rows = ["<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    rows += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def markdown_to_html(markdown: str) -> str:
    """HTML for the Markdown subset the benchmark writes (anything else becomes a paragraph)."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            blocks.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        heading = re.match(r"(#{1,4}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.strip():
            blocks.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(blocks)


def write_html_report(markdown_path: str | os.PathLike[str],
                      plots: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                      title: str = "cvmfs-ml benchmark") -> Path:
    """Write ``out``: the rendered summary followed by every plot (PNG), embedded."""
    body = markdown_to_html(Path(markdown_path).read_text())
    figures = []
    for plot in plots:
        png = Path(plot)
        if not png.is_file():
            continue
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        name = html.escape(png.name)
        figures.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{name}</figcaption></figure>")
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            f"{body}\n" + ("<h2>Plots</h2>\n" + "\n".join(figures) if figures else "")
            + "\n</body></html>\n")
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    return path
