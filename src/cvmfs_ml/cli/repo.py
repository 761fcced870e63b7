"""``cvmfs-ml repo ...``: create, publish and inspect repositories."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from cvmfs_ml.cli.client import ConfigOption, ProxyOption
from cvmfs_ml.cli.common import (
    LOCATION_HELP,
    REPO_HELP,
    BlacklistOption,
    JsonOption,
    KeyOption,
    TagOption,
    _entry_json,
    _fail,
    friendly,
    json_text,
    one_line,
    open_publisher,
    open_repository,
    refuse_url,
    use_blacklist,
    visible,
)
from cvmfs_ml.cli.s3 import S3ConfigOption, s3_params
from cvmfs_ml.client.entries import device_number
from cvmfs_ml.errors import CvmfsMlError

repo_app = typer.Typer(no_args_is_help=True, help="Create, publish and inspect repositories.")


# -- repo ----------------------------------------------------------------------------------------
@repo_app.command("create")
@friendly
def repo_create(
    root: Annotated[
        str, typer.Argument(help="folder that will hold ROOT/<fqrn>, or s3://BUCKET\\[/PREFIX]")
    ],
    fqrn: Annotated[str, typer.Option("--fqrn", help="repository name, e.g. models.cern.ch")],
    keys: Annotated[Path | None, typer.Option("--keys", help="keys folder (ROOT/../keys)")] = None,
    compression: Annotated[str, typer.Option(help="auto | zlib | none | isal")] = "auto",
    hash_algorithm: Annotated[
        str, typer.Option("--hash", help="sha1 | rmd160 | shake128")
    ] = "sha1",
    chunks: Annotated[
        str, typer.Option(help="MIN/AVG/MAX chunk sizes in MiB, e.g. 4/8/16; 'off' disables")
    ] = "4/8/16",
    ttl: Annotated[int, typer.Option(help="catalog TTL in seconds")] = 240,
    whitelist_days: Annotated[int, typer.Option(help="whitelist validity in days")] = 30,
    s3_config: S3ConfigOption = None,
) -> None:
    """Create a repository with fresh keys and an empty revision 0."""
    from cvmfs_ml.cvmfs.hashing import Algorithm
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

    refuse_url(root, "creating needs the repository folder's parent (or s3://BUCKET[/PREFIX]): "
               "run this where it will be published")  # fmt: skip
    settings = PublishSettings(
        compression=Compression(compression),
        hash_algorithm=Algorithm.from_name(hash_algorithm),
        ttl=ttl,
        whitelist_days=whitelist_days,
    )
    if chunks == "off":
        settings = settings.with_(use_chunking=False)
    else:
        try:
            low, avg, high = (int(float(x) * 2**20) for x in chunks.split("/"))
        except ValueError as exc:
            raise _fail(f"--chunks {chunks!r}: expected MIN/AVG/MAX in MiB") from exc
        settings = settings.with_(min_chunk_size=low, avg_chunk_size=avg, max_chunk_size=high)
    location = root if root.startswith("s3://") else Path(root)
    publisher = create_repository(
        location, fqrn, keys_dir=keys, settings=settings, s3_config=s3_params(s3_config)
    )
    readers = getattr(publisher.store, "public_url", None)
    where = f"; clients read {readers}" if readers else ""
    typer.echo(f"created {publisher.location} (keys in {publisher.keys_dir}{where})")


@repo_app.command("publish")
@friendly
def repo_publish(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    src: Annotated[Path, typer.Argument(help="folder or tarball to publish")],
    at: Annotated[str, typer.Option("--at", help="path inside the repository")] = "/",
    tag: Annotated[str | None, typer.Option("--tag", help="name this revision")] = None,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
    nested: Annotated[bool, typer.Option(help="make --at a nested catalog")] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish a folder or tarball as a new revision."""
    from cvmfs_ml.cli.progress import publish_progress

    publisher = open_publisher(repo, keys, s3_config)
    with publisher.transaction() as txn:
        if src.is_dir():
            txn.add_folder(src, at, nested_catalog=nested)
        elif src.is_file():
            txn.add_tarball(src, at, nested_catalog=nested)
        else:
            raise _fail(f"{src}: no such folder or tarball")
        with publish_progress(publisher, src):
            result = txn.commit(tag=tag)
    stats = result.stats
    summary = {
        "revision": result.revision,
        "root_catalog": result.manifest.catalog.hex,
        "files": stats.files,
        "bytes": stats.bytes_in,
        "new_objects": stats.objects_new,
        "existing_objects": stats.objects_existing,
        "stored_bytes": stats.bytes_stored,
        "reused_bytes": stats.bytes_existing,
        "unchanged_bytes": stats.bytes_unchanged,
        "seconds": round(result.seconds, 3),
    }
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        rate = stats.bytes_in / max(result.seconds, 1e-9) / 1e6
        typer.echo(
            f"revision {result.revision}: {stats.files} files, {stats.bytes_in / 1e6:.1f} MB, "
            f"{stats.objects_new} new objects, {result.seconds:.2f} s ({rate:.0f} MB/s)"
        )


@repo_app.command("rm")
@friendly
def repo_rm(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    paths: Annotated[list[str], typer.Argument(help="paths to remove")],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Remove paths (and everything below them) in a new revision."""
    publisher = open_publisher(repo, keys, s3_config)
    with publisher.transaction() as txn:
        for path in paths:
            txn.remove(path)
        result = txn.commit()
    typer.echo(f"revision {result.revision}: removed {len(paths)} path(s)")


@repo_app.command("check")
@friendly
def repo_check(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="skip hashing data objects")] = False,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
    repair_reflog: Annotated[bool, typer.Option(
        "--repair-reflog", help="first rebuild a damaged .cvmfsreflog (a local or S3 "
        "repository you publish; like cvmfs_server check -r)")] = False,
    keys: Annotated[Path | None, typer.Option("--keys", help="keys folder, for --repair-reflog")
                    ] = None,
) -> None:
    """Verify signatures, catalogs, counters and every referenced object; exit 1 on a defect."""
    from cvmfs_ml.client.check import check_repository

    if repair_reflog:
        if repo.startswith(("http://", "https://")):
            raise _fail("--repair-reflog rebuilds the reflog of a repository you publish: give "
                        "its folder or s3:// location, not a URL")  # fmt: skip
        publisher = open_publisher(repo, keys, s3_config)
        count = publisher.repair_reflog()
        typer.echo(f"rebuilt .cvmfsreflog of {publisher.fqrn}: {count} references; manifest "
                   "re-signed", err=True)  # fmt: skip
    use_blacklist(blacklist)
    with open_repository(repo, key, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        report = check_repository(repository, data=not no_data)
    problem = _reflog_problem(repo, keys, s3_config)
    if problem is not None:
        report.problems.append(problem)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "catalogs": report.catalogs,
                    "objects": report.objects,
                    "problems": report.problems,
                }
            )
        )
    else:
        for problem in report.problems:
            typer.echo(one_line(f"problem: {problem}"), err=True)
        typer.echo(
            f"{'ok' if report.ok else 'FAILED'}: {report.catalogs} catalogs, {report.objects} "
            f"objects ({report.bytes_checked / 1e6:.1f} MB), revisions {sorted(report.revisions)}"
        )
    if not report.ok:
        raise typer.Exit(1)


def _reflog_problem(repo: str, keys: Path | None, s3_config: Path | None) -> str | None:
    """Why the next publish would stop at the reflog, for a repository whose keys are at hand.

    Only there: a Stratum 1 keeps a reflog of its own, which the manifest's ``Y`` does not name.
    """
    from cvmfs_ml.errors import CvmfsMlError
    from cvmfs_ml.publish.repository import Publisher

    try:
        publisher = Publisher.open(repo, keys, s3_config=s3_params(s3_config))
    except (CvmfsMlError, OSError):
        return None  # a URL, a replica, or keys kept elsewhere: not ours to check
    try:
        publisher.check_reflog()
    except CvmfsMlError as exc:
        return str(exc)
    return None


@repo_app.command("ls")
@friendly
def repo_ls(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    path: Annotated[str, typer.Argument()] = "/",
    recursive: Annotated[bool, typer.Option("-R", "--recursive")] = False,
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    tag: TagOption = None,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
) -> None:
    """List a directory (or describe a file); links on the way are followed, as ``ls`` does."""
    use_blacklist(blacklist)
    with open_repository(repo, key, tag, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        entry = repository.lookup(path)
        if entry.is_symlink:
            with contextlib.suppress(CvmfsMlError, OSError):
                target = repository.resolve(path)
                entry = target if target.is_dir else entry
        path = entry.path
        if not entry.is_dir:
            entries = [entry]
        elif recursive:
            entries = list(repository.walk(path))
        else:
            entries = repository.listdir(path)
        if as_json:
            typer.echo(json_text([_entry_json(e) for e in entries]))
            return
        for e in entries:
            target = f" -> {e.symlink}" if e.is_symlink else ""
            kind = stat.filemode(e.mode)[0]  # d l - c b p s, as ls shows them
            rdev = device_number(e)
            size = f"{os.major(rdev)}, {os.minor(rdev)}" if rdev else str(e.size)
            name = e.path if recursive else (e.name or e.path)
            typer.echo(f"{kind}{stat.S_IMODE(e.mode):04o} {size:>12} {visible(name + target)}")


@repo_app.command("stat")
@friendly
def repo_stat(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    path: Annotated[str, typer.Argument()],
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    tag: TagOption = None,
    blacklist: BlacklistOption = None,
) -> None:
    """Print one entry as JSON, with its chunks (links in its folders followed)."""
    use_blacklist(blacklist)
    with open_repository(repo, key, tag, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        entry = repository.lookup(path)
        info = _entry_json(entry)
        if entry.is_regular:
            layout = repository.layout(entry)
            info["pieces"] = [
                {"offset": p.offset, "size": p.size, "hash": p.digest.hex} for p in layout.pieces
            ]
        typer.echo(json_text(info, indent=2))


@repo_app.command("cat")
@friendly
def repo_cat(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    path: Annotated[str, typer.Argument()],
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    tag: TagOption = None,
    blacklist: BlacklistOption = None,
) -> None:
    """Write a file's bytes to stdout."""
    use_blacklist(blacklist)
    repository = open_repository(
        repo, key, tag, config=config, proxy=proxy, s3_config=s3_params(s3_config)
    )
    with repository, repository.open_file(path) as handle:
        out = sys.stdout.buffer
        while block := handle.read(4 * 2**20):
            out.write(block)
        out.flush()


@repo_app.command("tags")
@friendly
def repo_tags(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List tags (named revisions)."""
    with open_repository(repo, key, config=config, proxy=proxy,
                         s3_config=s3_params(s3_config)) as repository:
        tags = sorted(repository.tags(), key=lambda t: (t.revision, t.name))
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "revision": t.revision,
                        "root_catalog": t.root_catalog.hex,
                        "timestamp": t.timestamp,
                        "description": t.description,
                    }
                    for t in tags
                ]
            )
        )
        return
    for t in tags:
        try:
            when = dt.datetime.fromtimestamp(t.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M")
        except (OverflowError, OSError, ValueError):  # past year 9999: no date holds it
            when = f"T={t.timestamp}"
        line = f"{t.name:<24} r{t.revision:<5} {when}  {t.root_catalog.hex}  {t.description}"
        typer.echo(visible(line))


@repo_app.command("diff")
@friendly
def repo_diff(
    repo: Annotated[str, typer.Argument(help=LOCATION_HELP)],
    old: Annotated[str, typer.Argument(help="tag of the old side")],
    new: Annotated[str, typer.Argument(help="tag of the new side")] = "trunk",
    key: KeyOption = None,
    s3_config: S3ConfigOption = None,
    config: ConfigOption = None,
    proxy: ProxyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Paths added (+), removed (-) and changed (M) between two tags."""
    from cvmfs_ml.client.diff import diff_trees

    s3 = s3_params(s3_config)
    a = open_repository(repo, key, old, config=config, proxy=proxy, s3_config=s3)
    with a, open_repository(repo, key, new, config=config, proxy=proxy, s3_config=s3) as b:
        changes = diff_trees(a, b)
    if as_json:
        typer.echo(json.dumps([{"change": c, "path": p} for c, p in changes]))
        return
    for change, path in changes:
        typer.echo(f"{change} {visible(path)}")


@repo_app.command("gc")
@friendly
def repo_gc(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Delete objects that neither HEAD nor any tag references."""
    from cvmfs_ml.cli.progress import polled_progress
    from cvmfs_ml.publish.gc import GcProgress, collect_garbage

    publisher = open_publisher(repo, keys, s3_config)
    live = GcProgress()
    with polled_progress(
        "garbage collection", None, lambda: (live.bytes_listed, live.objects_listed), unit="objects"
    ):
        report = collect_garbage(publisher, dry_run=dry_run, progress=live)
    verb, freed = ("would remove", "would free") if dry_run else ("removed", "freeing")
    typer.echo(
        f"{verb} {report.removed} objects, {freed} {report.bytes_removed / 1e6:.1f} MB; kept "
        f"{report.kept} ({report.bytes_kept / 1e6:.1f} MB)"
    )
    if report.older_tags:
        held = ", ".join(f"{name} (r{revision})" for name, revision in report.older_tags)
        typer.echo(f"older data still held by tags: {held}; remove them with 'repo tag -d'")


@repo_app.command("tag")
@friendly
def repo_tag(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    name: Annotated[str, typer.Argument()],
    description: Annotated[str, typer.Option("-m", "--message")] = "",
    remove: Annotated[bool, typer.Option("--remove", "-d")] = False,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Name the current revision (or remove a tag with -d)."""
    publisher = open_publisher(repo, keys, s3_config)
    if remove:
        publisher.remove_tag(name)
        typer.echo(f"removed tag {name}")
    else:
        manifest = publisher.tag(name, description)
        typer.echo(f"tagged revision {manifest.revision} as {name}")


@repo_app.command("rollback")
@friendly
def repo_rollback(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    tag: Annotated[str, typer.Argument(help="tag whose tree becomes the new revision")],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Publish an older tagged tree again as a new revision."""
    result = open_publisher(repo, keys, s3_config).rollback(tag)
    typer.echo(f"revision {result.revision}: rolled back to {tag}")


@repo_app.command("resign")
@friendly
def repo_resign(
    repo: Annotated[str, typer.Argument(help=REPO_HELP)],
    days: Annotated[int | None, typer.Option(help="validity in days")] = None,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    s3_config: S3ConfigOption = None,
) -> None:
    """Sign a fresh whitelist with the master key (before the old one expires)."""
    from cvmfs_ml.publish.settings import whitelist_validity

    valid_for = whitelist_validity(days) if days is not None else None
    publisher = open_publisher(repo, keys, s3_config)
    publisher.resign(valid_for=valid_for)
    typer.echo(f"whitelist of {publisher.fqrn} re-signed")
