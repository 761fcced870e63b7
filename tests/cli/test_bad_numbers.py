"""Numbers no command can use are refused at once, without a traceback, writing nothing.

Found by running every command with -1, 0, NaN and out-of-range values: before, ``serve --port
-1`` and ``bench sweep --fraction 2`` ended in tracebacks, ``repo resign --days -1`` wrote an
already-expired whitelist (every client then refused the repository), ``registry serve --poll
-1`` spun a core, ``wait --interval -1`` raised from ``time.sleep``, and ``repo create --ttl -1``
failed only after writing the keys, so the corrected command then failed too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvmfs_ml.publish.repository import create_repository

FQRN = "numbers.test"


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cvmfs_ml.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("numbers")
    create_repository(root / "srv", FQRN)
    (root / "wish.yaml").write_text("version: 1\n")
    return root


CASES = [
    ("repo", "create", "{new}", "--fqrn", "a.b.c", "--ttl", "-1"),
    ("repo", "create", "{new}", "--fqrn", "a.b.c", "--whitelist-days", "0"),
    ("repo", "create", "{new}", "--fqrn", "a.b.c", "--chunks", "8/4/16"),
    ("repo", "resign", "{repo}", "--days", "-1"),
    ("repo", "resign", "{repo}", "--days", "99999999999"),
    ("serve", "{srv}", "--port", "-1"),
    ("registry", "serve", "--repo", "{repo}", "--port", "70000"),
    ("registry", "serve", "--repo", "{repo}", "--poll", "-1", "--port", "0"),
    ("registry", "serve", "--repo", "{repo}", "--poll", "nan", "--port", "0"),
    ("wait", "grp/x", "--repo", "{repo}", "--key", "{keys}", "--interval", "-1"),
    ("sync", "{wish}", "--repo", "{repo}", "--loop", "--interval", "nan"),
    ("sync", "{wish}", "--repo", "{repo}", "--grace-period", "-1"),
    ("replica", "sync", "{repo}", "{new}", "--key", "{keys}", "--workers", "0"),
    ("bench", "sweep", "--fraction", "2", "--out", "{new}"),
    ("bench", "sweep", "--size-mib", "-1", "--out", "{new}"),
    ("demo", "--llm-mib", "0", "--out", "{new}"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: " ".join(case[:2] + case[-2:]))
def test_unusable_numbers_are_refused(site: Path, tmp_path: Path, case: tuple[str, ...]) -> None:
    names = {"new": tmp_path / "new", "repo": site / "srv" / FQRN, "srv": site / "srv",
             "keys": site / "keys", "wish": site / "wish.yaml"}  # fmt: skip
    whitelist = (site / "srv" / FQRN / ".cvmfswhitelist").read_bytes()
    served = sorted(os.listdir(site / "srv"))
    done = cli(*(part.format(**names) for part in case), cwd=tmp_path)
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    # ours (1) and the command line parser's usage errors (2) alike: one line
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / "keys").exists()
    assert (site / "srv" / FQRN / ".cvmfswhitelist").read_bytes() == whitelist
    assert sorted(os.listdir(site / "srv")) == served
