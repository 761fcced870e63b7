"""``bench run``'s options narrow a profile; bad names fail in one line before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cvmfs_ml.bench.profiles import PROFILES
from cvmfs_ml.cli.bench import bench_app, chosen_profile


def test_models_drop_the_squid_experiment_unless_they_name_its_model() -> None:
    full = PROFILES["full"]
    assert full.concurrency and full.concurrency_model == "llm-512m"
    llm = chosen_profile(full, models="phi3-1g", modes="local,fuse,get,upstream")
    assert [m.name for m in llm.models] == ["phi3-1g"]
    assert llm.concurrency == () and llm.access_models == ()
    assert llm.modes == ("local", "fuse", "get", "upstream")
    assert chosen_profile(full, states="cold", repeats=2).concurrency == full.concurrency


@pytest.mark.parametrize(("options", "words"), [
    ({"modes": "local,carrier-pigeon"}, "unknown modes ['carrier-pigeon']"),
    ({"states": "cold,tepid"}, "unknown states ['tepid']"),
    ({"networks": "wan-1s"}, "unknown networks ['wan-1s']"),
    ({"models": "nope"}, "unknown models ['nope']"),
    ({"repeats": 0}, "at least 1"),
])
def test_bad_names_fail_before_anything_runs(options: dict[str, object], words: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        chosen_profile(PROFILES["short"], **options)  # type: ignore[arg-type]
    assert words in capsys.readouterr().err


def test_the_command_refuses_a_bad_mode_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_app, ["run", "--modes", "fuse,ftp", "--out", str(out)])
    assert result.exit_code == 1 and "unknown modes ['ftp']" in result.output
    assert not out.exists()  # nothing built, nothing written


def test_the_full_profile_measures_the_llm_case_as_issue_13_asks() -> None:
    """Local disk, the FUSE mount and ``model get``; cold, warm and hot; loopback and 20 ms;
    >= 1 GiB of weights. The short profile carries a toy version."""
    full, short = PROFILES["full"], PROFILES["short"]
    llm = next(m for m in full.models if m.kind == "genai")
    assert llm.size >= 2**30
    assert {"local", "fuse", "get", "upstream"} <= set(full.modes)
    assert set(full.states) == {"cold", "warm", "hot"}
    assert "wan-20ms-1g" in full.networks and llm.name in full.network_models
    assert {"fuse", "get", "upstream"} <= set(full.network_modes)
    assert any(m.kind == "genai" for m in short.models)
    assert set(short.states) == {"cold", "warm", "hot"}
