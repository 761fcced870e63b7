"""A publish of many small files holds little memory per file.

A publish reads every file before it writes catalog rows, so it holds something per entry until
then. That used to be the file's opener, its ``SourceItem`` dict and one future per object (a lock
and a condition each): 3.3-3.8 KB per file, 757 MB of peak RSS for 200,000 empty files. A
fresh process publishes a warm-up folder, then a folder of many empty files, and reports its peak
RSS (``VmHWM``) after each: the growth per file is what the publish holds per entry. The files
are in one folder, whose listing the walk holds while its files are read (as ``DirEntry``
objects with their stat results, 0.8 KB each, before).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FILES = 30_000
PER_FILE_LIMIT = 1536  # bytes; the publisher held 3.3 KB per file before

PUBLISHER = r"""
import json, sys
from pathlib import Path
from cvmfs_ml.publish.repository import create_repository
from cvmfs_ml.publish.settings import PublishSettings

def peak_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")

root, warmup, many = map(Path, sys.argv[1:4])
publisher = create_repository(root, "many.test", settings=PublishSettings(workers=2))
result = {}
for name, src in (("warmup", warmup), ("many", many)):
    with publisher.transaction() as txn:
        txn.add_folder(src, "/" + name)
        txn.commit()
    result[name] = peak_kb()
print(json.dumps(result))
"""


def _folder(base: Path, folders: int, per_folder: int) -> Path:
    for f in range(folders):
        folder = base / f"d{f:03d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            (folder / f"f{i:05d}").touch()
    return base


def test_memory_per_small_file_is_bounded(tmp_path: Path) -> None:
    warmup = _folder(tmp_path / "warmup", 2, 200)
    many = _folder(tmp_path / "many", 1, FILES)  # one folder: its listing is held too
    out = subprocess.run(
        [sys.executable, "-c", PUBLISHER, str(tmp_path / "srv"), str(warmup), str(many)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout)
    per_file = (peaks["many"] - peaks["warmup"]) * 1024 / FILES
    assert per_file < PER_FILE_LIMIT, f"{per_file:.0f} bytes of peak RSS per file ({peaks})"
