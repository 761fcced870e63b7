"""Every command's --help renders (help texts are Rich markup: a literal ``[`` needs escaping)."""

from __future__ import annotations

from typing import Any

import typer.main
from typer.testing import CliRunner

from cvmfs_ml.cli import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    if hasattr(group, "list_commands"):  # a group (typer vendors its own click)
        ctx = group.context_class(group)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None, name
            found += _commands(command, (*path, name))
    return found


def test_every_help_renders_its_brackets() -> None:
    runner = CliRunner()
    root = typer.main.get_command(app)
    paths = _commands(root)
    assert ("repo", "create") in paths and ("model", "publish") in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output, result.exception)
        if path == ("repo", "create"):
            assert "s3://BUCKET[/PREFIX]" in result.output
        if path in (("repo", "publish"), ("model", "rm")):  # common.REPO_HELP
            assert "s3://BUCKET[/PREFIX]/FQRN" in result.output
        if path == ("model", "publish"):
            assert "hf:ORG/NAME[@REV]" in result.output
