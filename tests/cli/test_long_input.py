"""Errors that echo what they were given stay one short line, whatever its length.

A 6000-character URI given to ``kserve-init`` (or a URL given to a reader command) came back in
the error in full, some of them twice or more (the name and the URI it is part of; the URL and
each URL tried). Every line printed at the CLI edge now cuts a long word to its first
characters and says how long it was; the URI parser no longer repeats the name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.testing import free_port

LONG = 6000
MAX_LINE = 800  # a few cut words and the reason


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmfs_ml.cli", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def bounded_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one ``cvmfs-ml: ...`` line of a failure, short, saying how long the input was."""
    assert result.returncode == 1, result.stderr[:2000]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cvmfs-ml: "), result.stderr[:2000]
    line = lines[0]
    assert len(line) < MAX_LINE, f"{len(line)} characters: {line[:2000]}"
    assert " characters)" in line, line
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("cvmfs://" + "a" * LONG + "/model", "not a repository name"),
        ("cvmfs://models.test.org/" + "p" * LONG, "longer than 4096"),
        ("s3://" + "b" * LONG, "not a cvmfs://"),
        ("cvmfs://models.test.org/" + "d/" * (LONG // 2), "longer than 4096"),
    ],
    ids=["name", "path", "scheme", "folders"],
)
def test_kserve_init_with_a_very_long_uri(tmp_path: Path, uri: str, reason: str) -> None:
    line = bounded_failure(cli("kserve-init", uri, tmp_path / "dest"), reason)
    assert f"({len(repr(uri))} characters)" in line
    assert not (tmp_path / "dest").exists()


def test_reader_command_with_a_very_long_url(tmp_path: Path) -> None:
    """The URL is in the message once per attempt: each is cut."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    key = tmp_path / "some.pub"
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    key.write_bytes(public.public_bytes(*pem))
    url = f"http://127.0.0.1:{free_port()}/cvmfs/" + "x" * LONG  # nothing listens there
    bounded_failure(cli("repo", "ls", url, "--key", key), "could not fetch", "connection refused")


def test_model_path_with_a_very_long_reference() -> None:
    bounded_failure(cli("model", "path", "hep/" + "n" * LONG + ":1"))


def test_one_line_cuts_long_words_and_escapes_newlines() -> None:
    from cvmfs_ml.cli.common import one_line
    from cvmfs_ml.errors import ECHO_LIMIT, bounded

    word = "u" * LONG
    text = one_line(f"refusing {word}: first\nsecond \x1b[2J")
    cut = f"{'u' * ECHO_LIMIT}... ({LONG + 1} characters)"  # the ':' was part of the word
    assert text == f"refusing {cut} first\\x0asecond \\x1b[2J"
    assert one_line(text) == text  # what is already cut is not cut again
    assert bounded(word) == "u" * ECHO_LIMIT + f"... ({LONG} characters)"
    assert bounded("short") == "short"
    many = one_line(" ".join(["w" * ECHO_LIMIT] * 40))  # long only as a whole
    assert len(many) < 9 * ECHO_LIMIT and many.endswith(f"({40 * (ECHO_LIMIT + 1) - 1} characters)")
