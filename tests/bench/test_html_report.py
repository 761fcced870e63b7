"""report.html: the Markdown subset renders, text is escaped, and a browser shows the tables."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cvmfs_ml.bench.html_report import markdown_to_html, write_html_report

MD = """# cvmfs-ml benchmark: profile `short`

- run `abc`, machine <2 CPUs>

## mlp (1 MiB, onnxruntime) — loopback

| mode | cache | first inference |
|---|---|---|
| fuse | cold | 0.123 s |
| local | hot | 0.010 s |

## Sanity checks

- **PASS** outputs_identical: same
"""


def test_markdown_subset_renders_and_escapes() -> None:
    page = markdown_to_html(MD)
    assert "<h1>cvmfs-ml benchmark: profile <code>short</code></h1>" in page
    assert "&lt;2 CPUs&gt;" in page and "<2 CPUs>" not in page
    assert page.count("<tr>") == 3 and "<th>first inference</th>" in page
    assert "<td>0.123 s</td>" in page and "<strong>PASS</strong>" in page
    assert page.count("<ul>") == 2


def test_links_only_to_files_beside_the_report() -> None:
    page = markdown_to_html(
        "| picture |\n|---|\n| [heatmap-x](access/heatmap-x.png) |\n\n"
        "[a](javascript:alert(1)) [b](../etc/passwd) [c](x/../../y) [d](http://e.org/f)"
    )
    assert '<td><a href="access/heatmap-x.png">heatmap-x</a></td>' in page
    # anything with a scheme or a way out of the report's folder stays text
    assert page.count("<a ") == 1
    assert "[a](javascript:alert(1))" in page and "[b](../etc/passwd)" in page
    assert "[c](x/../../y)" in page and "[d](http://e.org/f)" in page


def test_chromium_shows_the_report(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (Debian package)")
        pytest.skip("chromium not installed")
    (tmp_path / "summary.md").write_text(MD)
    report = write_html_report(tmp_path / "summary.md", [], tmp_path / "report.html")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         report.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The DOM the browser built from the page holds the table cells as cells.
    assert "<td>0.123 s</td>" in proc.stdout and "<th>mode</th>" in proc.stdout
