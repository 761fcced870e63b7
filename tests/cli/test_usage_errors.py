"""A command line the parser refuses gets one bounded line on stderr, like every other failure.

typer printed its usage errors as a usage line, a hint and a framed box (four to six lines),
and echoed the offending word in full: an unknown option of 3000 characters filled a 4 kB box.
Scripts that keep the last line of stderr kept the box's bottom border. Help stays as it was:
``--help`` and a group called without a command print the help on stdout.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

MAX_LINE = 800


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def usage_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[:2000]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[:2000]
    line = lines[0]
    assert line.startswith("cvmfs-ml: "), line
    assert len(line) < MAX_LINE, f"{len(line)} characters: {line[:2000]}"
    return line


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["repo", "ls", "--no-such-option"], ["--no-such-option", "'cvmfs-ml repo ls --help'"]),
        (["serve", "root", "--port", "abc"], ["--port", "'cvmfs-ml serve --help'"]),
        (["no-such-command"], ["no-such-command", "'cvmfs-ml --help'"]),
        (["model", "path"], ["Missing argument", "'cvmfs-ml model path --help'"]),
        (["--no-such-option"], ["--no-such-option", "'cvmfs-ml --help'"]),
    ],
    ids=["option", "value", "command", "argument", "top-level"],
)
def test_usage_error_is_one_line(args: list[str], needles: list[str]) -> None:
    line = usage_line(cli(*args))
    for needle in needles:
        assert needle in line, line


def test_a_very_long_unknown_option_is_cut() -> None:
    option = "--" + "x" * 3000
    line = usage_line(cli("repo", "ls", option))
    assert "No such option" in line
    assert " characters)" in line, line  # the word is cut and its length given


def test_help_is_unchanged() -> None:
    for args in (["--help"], ["repo", "--help"]):
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert "Usage: cvmfs-ml" in done.stdout and "ls" in done.stdout
    for args in ([], ["repo"]):  # a group without a command: its help, exit 2 as click does
        done = cli(*args)
        assert done.returncode == 2, done.stderr
        assert "Usage: cvmfs-ml" in done.stdout, done.stdout[:500]
        assert "Commands" in done.stdout
        assert done.stderr == ""
