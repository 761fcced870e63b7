"""The README's main job runs end to end and its outputs are sane."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cvmfs_ml.bench.demo import run_demo


@pytest.mark.service
def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", llm_bytes=8 * 2**20, log=lambda _m: None)
    modes = {(r.model, r.mode, r.cache) for r in result.rows}
    for model in ("mlp", "llm"):
        assert (model, "local disk", "cold") in modes
        assert (model, "cvmfs-ml fsspec (download)", "cold") in modes
        if os.path.exists("/dev/fuse") or os.environ.get("CI"):
            assert (model, "cvmfs-ml FUSE", "cold") in modes, result.skipped
            assert (model, "cvmfs-ml FUSE", "hot") in modes
    assert all(r.identical_output for r in result.rows)
    assert all(r.open_s > 0 for r in result.rows)
    fsspec_llm = next(r for r in result.rows if r.model == "llm" and "fsspec" in r.mode)
    assert fsspec_llm.bytes_from_network >= 8 * 2**20
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["url"].endswith("/cvmfs/demo.cvmfs-ml.local") and len(saved["rows"]) == len(
        result.rows
    )


def test_demo_folder_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    from cvmfs_ml.bench.demo import MARKER, prepare_out
    from cvmfs_ml.errors import ConfigError

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not made by the demo"):
        prepare_out(precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out(a_file)

    fresh = prepare_out(tmp_path / "new" / "demo")
    assert fresh.is_absolute() and (fresh / MARKER).is_file()
    (fresh / "models").mkdir()
    (fresh / "models" / "old.onnx").write_bytes(b"old")
    again = prepare_out(fresh)  # an earlier demo's folder is emptied, marker kept
    assert sorted(p.name for p in again.iterdir()) == [MARKER]


def test_demo_cli_refuses_a_foreign_folder_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "keep.txt").write_text("keep")
    proc = subprocess.run(
        [sys.executable, "-m", "cvmfs_ml", "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "not made by the demo" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "keep.txt").read_text() == "keep"


@pytest.mark.service
def test_sigterm_cleans_up_what_the_demo_started(tmp_path: Path) -> None:
    """A walltime kill (SIGTERM) used to end the process on the spot: the demo's FUSE mount and
    its daemon stayed behind, serving a repository whose server had gone."""
    import signal
    import subprocess
    import sys

    from waiting import wait_until

    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs FUSE for the mount it must clean up")
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvmfs_ml.cli", "demo", "--out", str(out), "--llm-mib", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def mounts() -> list[str]:
        return [line for line in Path("/proc/mounts").read_text().splitlines() if str(out) in line]

    def ours() -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(out).encode() in cmdline and int(pid) != proc.pid:
                found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
        return found

    try:
        wait_until(lambda: mounts() or proc.poll() is not None, 600, "the demo mounted")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "stopping (SIGTERM)" in err and "Traceback" not in err, err
        assert mounts() == []
        wait_until(lambda: not ours(), 60, lambda: f"processes left: {ours()}")
    finally:
        proc.kill()
        for line in mounts():
            subprocess.run(["fusermount3", "-uz", line.split()[1]], check=False)
