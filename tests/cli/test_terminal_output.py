"""What the CLI prints from a repository reaches the reader's terminal as text, never as commands.

File names, symlink targets, tag descriptions and model.json fields come from repositories
anyone can publish. Printed raw, an escape sequence in a file name (``ESC ] 0 ; ... BEL`` sets
the window title, ``ESC [ 2 J`` clears the screen, some terminals answer queries into the
input) drove the terminal of whoever ran ``repo ls``, and a newline made one name look like two
lines. They are shown as escapes now. JSON output is escaped by the encoder, except what it
leaves raw (C1 controls such as CSI, bidi overrides): those are written as ``\\uXXXX`` too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.cli.common import visible

HOSTILE = "title\x1b]0;owned\x07"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name.onnx", "plain name.onnx"),
        ("é ü 模型", "é ü 模型"),  # printable text of any script stays as it is
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("two\nlines\ttab", "two\\x0alines\\x09tab"),
        ("c1\x9bcsi\x7f", "c1\\x9bcsi\\x7f"),
        ("bidi\u202eexe.txt", "bidi\\u202eexe.txt"),  # "Trojan source" reordering
        ("raw\udcffbyte", "raw\udcffbyte"),  # not UTF-8: written as the same byte, as ls does
        ("c1\udc9bbyte", "c1\\x9bbyte"),  # ... unless it is a C1 control (CSI)
        ("lone\ud800", "lone\\ud800"),  # no byte decodes to it: it could not be written
    ],
)
def test_visible_escapes_what_acts_on_a_terminal(text: str, shown: str) -> None:
    assert visible(text) == shown


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", *map(str, args)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_names_and_model_fields_print_as_escapes(tmp_path: Path) -> None:
    assert _cli("repo", "create", tmp_path / "srv", "--fqrn", "term.test").returncode == 0
    repo = tmp_path / "srv" / "term.test"
    src = tmp_path / "src"
    src.mkdir()
    (src / HOSTILE).write_bytes(b"x")
    (src / "two\nlines").write_bytes(b"y")
    (src / "link").symlink_to(HOSTILE)
    (src / "README.md").write_text(f"---\nlicense: {HOSTILE}\n---\n")
    published = _cli("model", "publish", src, "--repo", repo, "--as", "t/m:1")
    assert published.returncode == 0, published.stderr
    raw = _cli("repo", "publish", repo, src, "--at", "/raw")  # symlinks kept as they are
    assert raw.returncode == 0, raw.stderr

    listing = _cli("repo", "ls", repo, "/raw")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    assert "title\\x1b]0;owned\\x07" in listing.stdout
    assert "two\\x0alines" in listing.stdout
    assert "link -> title\\x1b]0;owned\\x07" in listing.stdout
    assert len(listing.stdout.splitlines()) == 4  # README.md, link and the two: one line each

    info = _cli("model", "info", repo, "t/m:1")
    assert info.returncode == 0, info.stderr
    assert "\x1b" not in info.stdout and "\x07" not in info.stdout
    assert "license:      title\\x1b]0;owned\\x07" in info.stdout
    listed = _cli("model", "ls", repo)
    assert listed.returncode == 0 and "t/m" in listed.stdout, listed.stderr


def test_json_output_escapes_c1_controls_and_bidi_overrides(tmp_path: Path) -> None:
    assert _cli("repo", "create", tmp_path / "srv", "--fqrn", "json.test").returncode == 0
    repo = tmp_path / "srv" / "json.test"
    name = "csi\u009b2Jbidi\u202etxt.exe"
    src = tmp_path / "src"
    src.mkdir()
    (src / name).write_bytes(b"x")
    (src / "README.md").write_text(f"---\nlicense: {name}\n---\n")
    assert _cli("model", "publish", src, "--repo", repo, "--as", "t/m:1").returncode == 0
    assert _cli("repo", "publish", repo, src, "--at", "/raw").returncode == 0
    for args in (("repo", "ls", repo, "/raw"), ("model", "info", repo, "t/m:1")):
        args = (*args, "--json")
        out = _cli(*args)
        assert out.returncode == 0, out.stderr
        assert "\u009b" not in out.stdout and "\u202e" not in out.stdout, args
        assert name in json.dumps(json.loads(out.stdout), ensure_ascii=False), args


def test_repo_check_problems_print_as_escapes(tmp_path: Path) -> None:
    """A problem names what it found it in: a nested catalog's folder is a name from the
    repository, and ``repo check`` printed it raw on stderr."""
    assert _cli("repo", "create", tmp_path / "srv", "--fqrn", "term.test").returncode == 0
    repo = tmp_path / "srv" / "term.test"
    nested = tmp_path / "src" / HOSTILE
    nested.mkdir(parents=True)
    (nested / ".cvmfscatalog").write_bytes(b"")
    (nested / "weights.bin").write_bytes(b"w")
    assert _cli("repo", "publish", repo, tmp_path / "src").returncode == 0
    manifest = (repo / ".cvmfspublished").read_bytes().split(b"\n--\n")[0]
    root = next(line[1:].decode() for line in manifest.splitlines() if line.startswith(b"C"))
    for catalog in (repo / "data").glob("*/*C"):
        if catalog.parent.name + catalog.name[:-1] != root:
            catalog.unlink()  # the nested catalog is gone: a problem naming its folder

    checked = _cli("repo", "check", repo)
    assert checked.returncode == 1, checked.stderr
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert problems, checked.stderr
    assert "\x1b" not in checked.stderr and "\x07" not in checked.stderr
    assert any("title\\x1b]0;owned\\x07" in line for line in problems), problems
