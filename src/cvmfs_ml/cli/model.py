"""``cvmfs-ml model ...``: publish, list, inspect, remove and alias model versions.

The layout these commands maintain is described in :mod:`cvmfs_ml.models.layout` and
docs/model-layout.md. Writing commands take the repository folder (they need the keys); ``ls``,
``info`` and ``check`` also read a repository over HTTP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cvmfs_ml.cli.client import ConfigOption, ProxyOption
from cvmfs_ml.cli.common import (
    LOCATION_HELP,
    REPO_HELP,
    BlacklistOption,
    JsonOption,
    KeyOption,
    _fail,
    friendly,
    json_text,
    one_line,
    open_publisher,
    open_repository,
    use_blacklist,
    visible,
    warn,
)
from cvmfs_ml.cli.s3 import S3ConfigOption, s3_params

model_app = typer.Typer(no_args_is_help=True, help="Publish and browse model versions.")


KeysOption = Annotated[
    Path | None, typer.Option("--keys", help="keys folder (default: ROOT/../keys)")
]


def _ref(text: str, *, require_version: bool = False) -> Any:
    from cvmfs_ml.models.layout import ModelRef

    try:
        return ModelRef.parse(text, require_version=require_version)
    except ValueError as exc:
        raise _fail(str(exc)) from exc


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _resolve_source(src: str, revision: str | None) -> Path:
    """``hf:org/name[@rev]`` from the local hub cache, a ``models--*`` folder at ``revision``,
    or the path as given."""
    from cvmfs_ml.models.sources.huggingface import (
        find_hf_snapshot,
        lookup_cached,
        parse_hf_spec,
    )

    if src.startswith("hf:"):
        try:
            repo_id, spec_revision = parse_hf_spec(src)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        return lookup_cached(repo_id, revision or spec_revision).snapshot
    path = Path(src)
    if revision is not None:
        found = find_hf_snapshot(path, revision) if path.is_dir() else None
        if found is None:
            raise _fail(f"--revision needs a Hugging Face cache folder or hf:ORG/NAME, not {src}")
        return found.snapshot
    return path


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _row(record: Any) -> dict[str, Any]:
    out = record.summary()
    out.update(
        {
            "ref": str(record.ref),
            "namespace": record.ref.namespace,
            "name": record.ref.name,
            "version": record.version,
            "path": record.path,
            "aliases": sorted(record.aliases),
        }
    )
    return out


@model_app.command("publish")
@friendly
def model_publish(
    src: Annotated[
        str, typer.Argument(help="file, folder, HF cache snapshot, or hf:ORG/NAME\\[@REV]")
    ],
    repo: Annotated[
        str, typer.Option("--repo", help=REPO_HELP)
    ],
    as_ref: Annotated[str, typer.Option("--as", help="NAMESPACE/NAME:VERSION")],
    description: Annotated[str, typer.Option("--description", "-m")] = "",
    license_: Annotated[
        str | None, typer.Option("--license", help="override the detected license")
    ] = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="also point this alias at it (repeat)")
    ] = None,
    no_latest: Annotated[bool, typer.Option("--no-latest", help="leave 'latest' alone")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="ref or commit of a Hugging Face cache folder")
    ] = None,
    keys: KeysOption = None,
    as_json: JsonOption = False,
    s3_config: S3ConfigOption = None,
) -> None:
    """Publish SRC as an immutable version (same bytes again: nothing to do)."""
    from cvmfs_ml.models.layout import ALIAS_LATEST
    from cvmfs_ml.models.publish import publish_model

    ref = _ref(as_ref, require_version=True)
    path = _resolve_source(src, revision)
    aliases = ([] if no_latest else [ALIAS_LATEST]) + list(alias or [])
    publisher = open_publisher(repo, keys, s3_config)
    before = publisher.manifest().revision
    from cvmfs_ml.cli.progress import publish_progress

    try:
        with publish_progress(publisher, Path(path), f"publishing {ref}"):
            record = publish_model(
                publisher, path, ref, description=description, license=license_, aliases=aliases
            )
    except ValueError as exc:  # an invalid alias name
        raise _fail(str(exc)) from exc
    revision_now = publisher.manifest().revision
    published = revision_now != before
    stats = publisher.last_result.stats if publisher.last_result is not None else None
    new_bytes = stats.bytes_stored if stats is not None else 0
    reused_bytes = (stats.bytes_existing + stats.bytes_unchanged) if stats is not None else 0
    if as_json:
        out = _row(record)
        out.update(
            {
                "published": published,
                "revision": revision_now,
                "new_bytes": new_bytes,
                "reused_bytes": reused_bytes,
            }
        )
        typer.echo(json.dumps(out))
        return
    if not published:
        typer.echo(f"{ref} is already published with the same content; nothing to do")
        return
    aliases_text = f"; aliases: {', '.join(record.aliases)}" if record.aliases else ""
    typer.echo(
        f"revision {revision_now}: published {ref} at {record.path} ({_files(record.file_count)}, "
        f"{_size(record.size)}, format {record.format or 'unknown'}){aliases_text}"
    )
    typer.echo(
        f"stored {_size(new_bytes)} new, reused {_size(reused_bytes)} already in the repository"
    )


@model_app.command("ls")
@friendly
def model_ls(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    key: KeyOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    s3_config: S3ConfigOption = None,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
) -> None:
    """List every model version (from the repository's index)."""
    use_blacklist(blacklist)
    from cvmfs_ml.models.publish import list_models

    notes: list[str] = []  # printed once it worked: a failure stays one line
    with open_repository(repo, key, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        records = list_models(repository, warn=notes.append)
    for note in notes:  # an index that does not read: listed from the tree
        warn(note)
    if as_json:
        typer.echo(json_text([_row(r) for r in records]))
        return
    if not records:
        typer.echo("no models", err=True)
        return
    header = ("MODEL", "VERSION", "FORMAT", "SIZE", "CREATED", "ALIASES")
    rows = [
        tuple(
            visible(cell)  # every field comes from the repository's index
            for cell in (
                r.ref.key, r.version, r.format or "-", _size(r.size), r.created,
                ",".join(r.aliases) or "-",
            )
        )
        for r in records
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@model_app.command("info")
@friendly
def model_info_cmd(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    ref: Annotated[str, typer.Argument(help="NAMESPACE/NAME[:VERSION or alias] (default latest)")],
    key: KeyOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    s3_config: S3ConfigOption = None,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
) -> None:
    """Show one version's model.json: files, hashes, formats, source, aliases."""
    use_blacklist(blacklist)
    from cvmfs_ml.models.publish import model_info

    parsed = _ref(ref)
    with open_repository(repo, key, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        record = model_info(repository, parsed)
    if as_json:
        typer.echo(json_text(record.info()))
        return
    source = ", ".join(f"{k}={v}" for k, v in record.source.items() if k != "refs")
    lines = [
        f"model:        {record.ref}",
        f"path:         {record.path}",
        f"format:       {record.format or 'unknown'}",
        f"size:         {_size(record.size)} in {_files(record.file_count)}",
        f"aliases:      {', '.join(record.aliases) or '-'}",
        f"license:      {record.license or '-'}",
        f"created:      {record.created} by {record.published_by or '?'}",
        f"source:       {source or '-'}",
    ]
    if record.description:
        lines.append(f"description:  {record.description}")
    for path, desc in record.models.items():
        params = desc.get("parameters")
        counted = f", {params:,} parameters" if isinstance(params, int) else ""
        lines.append(f"model file:   {path} ({desc.get('format')}{counted})")
    lines.append("files:")
    lines += [f"  {f.sha256[:16]}  {f.size:>14,}  {f.path}" for f in record.files]
    typer.echo("\n".join(visible(line) for line in lines))  # model.json is anyone's


@model_app.command("rm")
@friendly
def model_rm(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    ref: Annotated[str, typer.Argument(help="NAMESPACE/NAME:VERSION")],
    keys: KeysOption = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Remove a version in a new revision (its data stays until `repo gc`)."""
    from cvmfs_ml.models.publish import remove_model

    parsed = _ref(ref, require_version=True)
    publisher = open_publisher(repo, keys, s3_config)
    remove_model(publisher, parsed)
    typer.echo(
        f"revision {publisher.manifest().revision}: removed {parsed} "
        "(objects stay until 'cvmfs-ml repo gc')"
    )


@model_app.command("alias")
@friendly
def model_alias(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    model: Annotated[str, typer.Argument(help="NAMESPACE/NAME")],
    alias: Annotated[str, typer.Argument(help="alias name, e.g. latest, stable, prod")],
    version: Annotated[str | None, typer.Argument(help="version the alias points at")] = None,
    remove: Annotated[bool, typer.Option("--remove", "-d", help="remove the alias")] = False,
    keys: KeysOption = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Point ALIAS at VERSION (create or move it), or remove it with --remove."""
    from cvmfs_ml.models.publish import remove_alias, set_alias

    parsed = _ref(model)
    if parsed.version is not None:
        raise _fail(f"give the model as NAMESPACE/NAME and the version separately, not {model}")
    publisher = open_publisher(repo, keys, s3_config)
    try:
        if remove:
            remove_alias(publisher, parsed, alias)
            typer.echo(f"removed alias {parsed.key}/{alias}")
            return
        if version is None:
            raise _fail("give the VERSION the alias points at (or --remove)")
        set_alias(publisher, parsed, alias, version)
    except ValueError as exc:  # an invalid alias or version name
        raise _fail(str(exc)) from exc
    typer.echo(f"{parsed.key}/{alias} -> {version}")


@model_app.command("check")
@friendly
def model_check(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    key: KeyOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    s3_config: S3ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare the index with the tree (versions, model.json, aliases); exit 1 on a mismatch."""
    from cvmfs_ml.models.tree import check_layout

    with open_repository(repo, key, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        problems = check_layout(repository)
    if as_json:
        typer.echo(json.dumps({"ok": not problems, "problems": problems}))
    else:
        for problem in problems:  # names from the repository: anyone's
            typer.echo(one_line(f"problem: {problem}"), err=True)
        typer.echo("ok: index matches the tree" if not problems else "FAILED")
    if problems:
        raise typer.Exit(1)


@model_app.command("reindex")
@friendly
def model_reindex(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    keys: KeysOption = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Rewrite /.cvmfs-ml/index.json from the tree (after hand edits with `repo rm`)."""
    from cvmfs_ml.models.publish import reindex

    index = reindex(open_publisher(repo, keys, s3_config))
    versions = sum(len(m.versions) for m in index.models.values())
    typer.echo(f"index rebuilt: {len(index.models)} models, {versions} versions")


__all__ = ["model_app"]
