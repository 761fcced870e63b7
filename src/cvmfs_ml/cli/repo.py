"""``cvmfs-ml repo ...``: create, publish and inspect repositories."""

from __future__ import annotations

import datetime as dt
import json
import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from cvmfs_ml.cli.common import (
    BlacklistOption,
    JsonOption,
    KeyOption,
    TagOption,
    _entry_json,
    _fail,
    friendly,
    open_repository,
    use_blacklist,
)

repo_app = typer.Typer(no_args_is_help=True, help="Create, publish and inspect repositories.")


# -- repo ----------------------------------------------------------------------------------------
@repo_app.command("create")
@friendly
def repo_create(
    root: Annotated[Path, typer.Argument(help="folder that will hold ROOT/<fqrn>")],
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
) -> None:
    """Create a repository with fresh keys and an empty revision 0."""
    from cvmfs_ml.cvmfs.hashing import Algorithm
    from cvmfs_ml.cvmfs.objects import Compression
    from cvmfs_ml.publish.repository import create_repository
    from cvmfs_ml.publish.settings import PublishSettings

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
    publisher = create_repository(root, fqrn, keys_dir=keys, settings=settings)
    typer.echo(f"created {publisher.repo_dir} (keys in {publisher.keys_dir})")


@repo_app.command("publish")
@friendly
def repo_publish(
    repo: Annotated[Path, typer.Argument(help="repository folder (holds .cvmfspublished)")],
    src: Annotated[Path, typer.Argument(help="folder or tarball to publish")],
    at: Annotated[str, typer.Option("--at", help="path inside the repository")] = "/",
    tag: Annotated[str | None, typer.Option("--tag", help="name this revision")] = None,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    nested: Annotated[bool, typer.Option(help="make --at a nested catalog")] = False,
    as_json: JsonOption = False,
) -> None:
    """Publish a folder or tarball as a new revision."""
    from cvmfs_ml.publish.repository import Publisher

    publisher = Publisher.open(repo, keys)
    with publisher.transaction() as txn:
        if src.is_dir():
            txn.add_folder(src, at, nested_catalog=nested)
        elif src.is_file():
            txn.add_tarball(src, at, nested_catalog=nested)
        else:
            raise _fail(f"{src}: no such folder or tarball")
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
    repo: Annotated[Path, typer.Argument()],
    paths: Annotated[list[str], typer.Argument(help="paths to remove")],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
) -> None:
    """Remove paths (and everything below them) in a new revision."""
    from cvmfs_ml.publish.repository import Publisher

    publisher = Publisher.open(repo, keys)
    with publisher.transaction() as txn:
        for path in paths:
            txn.remove(path)
        result = txn.commit()
    typer.echo(f"revision {result.revision}: removed {len(paths)} path(s)")


@repo_app.command("check")
@friendly
def repo_check(
    repo: Annotated[str, typer.Argument(help="repository folder or URL")],
    key: KeyOption = None,
    no_data: Annotated[bool, typer.Option("--no-data", help="skip hashing data objects")] = False,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
) -> None:
    """Verify signatures, catalogs, counters and every referenced object; exit 1 on a defect."""
    from cvmfs_ml.client.check import check_repository

    use_blacklist(blacklist)
    with open_repository(repo, key) as repository:
        report = check_repository(repository, data=not no_data)
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
            typer.echo(f"problem: {problem}", err=True)
        typer.echo(
            f"{'ok' if report.ok else 'FAILED'}: {report.catalogs} catalogs, {report.objects} "
            f"objects ({report.bytes_checked / 1e6:.1f} MB), revisions {sorted(report.revisions)}"
        )
    if not report.ok:
        raise typer.Exit(1)


@repo_app.command("ls")
@friendly
def repo_ls(
    repo: Annotated[str, typer.Argument(help="repository folder or URL")],
    path: Annotated[str, typer.Argument()] = "/",
    recursive: Annotated[bool, typer.Option("-R", "--recursive")] = False,
    key: KeyOption = None,
    tag: TagOption = None,
    as_json: JsonOption = False,
    blacklist: BlacklistOption = None,
) -> None:
    """List a directory (or describe a file)."""
    use_blacklist(blacklist)
    with open_repository(repo, key, tag) as repository:
        entry = repository.stat(path)
        if not entry.is_dir:
            entries = [entry]
        elif recursive:
            entries = list(repository.walk(path))
        else:
            entries = repository.listdir(path)
        if as_json:
            typer.echo(json.dumps([_entry_json(e) for e in entries], ensure_ascii=False))
            return
        for e in entries:
            target = f" -> {e.symlink}" if e.is_symlink else ""
            kind = "d" if e.is_dir else "l" if e.is_symlink else "-"
            name = e.path if recursive else (e.name or e.path)
            typer.echo(f"{kind}{stat.S_IMODE(e.mode):04o} {e.size:>12} {name}{target}")


@repo_app.command("stat")
@friendly
def repo_stat(
    repo: Annotated[str, typer.Argument()],
    path: Annotated[str, typer.Argument()],
    key: KeyOption = None,
    tag: TagOption = None,
    blacklist: BlacklistOption = None,
) -> None:
    """Print one entry as JSON, with its chunks."""
    use_blacklist(blacklist)
    with open_repository(repo, key, tag) as repository:
        entry = repository.stat(path)
        info = _entry_json(entry)
        if entry.is_regular:
            layout = repository.layout(entry)
            info["pieces"] = [
                {"offset": p.offset, "size": p.size, "hash": p.digest.hex} for p in layout.pieces
            ]
        typer.echo(json.dumps(info, ensure_ascii=False, indent=2))


@repo_app.command("cat")
@friendly
def repo_cat(
    repo: Annotated[str, typer.Argument()],
    path: Annotated[str, typer.Argument()],
    key: KeyOption = None,
    tag: TagOption = None,
    blacklist: BlacklistOption = None,
) -> None:
    """Write a file's bytes to stdout."""
    use_blacklist(blacklist)
    with open_repository(repo, key, tag) as repository, repository.open(path) as handle:
        out = sys.stdout.buffer
        while block := handle.read(4 * 2**20):
            out.write(block)
        out.flush()


@repo_app.command("tags")
@friendly
def repo_tags(
    repo: Annotated[str, typer.Argument()],
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List tags (named revisions)."""
    with open_repository(repo, key) as repository:
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
        when = dt.datetime.fromtimestamp(t.timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{t.name:<24} r{t.revision:<5} {when}  {t.root_catalog.hex}  {t.description}")


@repo_app.command("diff")
@friendly
def repo_diff(
    repo: Annotated[str, typer.Argument()],
    old: Annotated[str, typer.Argument(help="tag of the old side")],
    new: Annotated[str, typer.Argument(help="tag of the new side")] = "trunk",
    key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Paths added (+), removed (-) and changed (M) between two tags."""
    from cvmfs_ml.client.diff import diff_trees

    with open_repository(repo, key, old) as a, open_repository(repo, key, new) as b:
        changes = diff_trees(a, b)
    if as_json:
        typer.echo(json.dumps([{"change": c, "path": p} for c, p in changes]))
        return
    for change, path in changes:
        typer.echo(f"{change} {path}")


@repo_app.command("gc")
@friendly
def repo_gc(
    repo: Annotated[Path, typer.Argument()],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Delete objects that neither HEAD nor any tag references."""
    from cvmfs_ml.publish.gc import collect_garbage
    from cvmfs_ml.publish.repository import Publisher

    report = collect_garbage(Publisher.open(repo, keys), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    typer.echo(
        f"{verb} {report.removed} objects ({report.bytes_removed / 1e6:.1f} MB), kept {report.kept}"
    )


@repo_app.command("tag")
@friendly
def repo_tag(
    repo: Annotated[Path, typer.Argument()],
    name: Annotated[str, typer.Argument()],
    description: Annotated[str, typer.Option("-m", "--message")] = "",
    remove: Annotated[bool, typer.Option("--remove", "-d")] = False,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
) -> None:
    """Name the current revision (or remove a tag with -d)."""
    from cvmfs_ml.publish.repository import Publisher

    publisher = Publisher.open(repo, keys)
    if remove:
        publisher.remove_tag(name)
        typer.echo(f"removed tag {name}")
    else:
        manifest = publisher.tag(name, description)
        typer.echo(f"tagged revision {manifest.revision} as {name}")


@repo_app.command("rollback")
@friendly
def repo_rollback(
    repo: Annotated[Path, typer.Argument()],
    tag: Annotated[str, typer.Argument(help="tag whose tree becomes the new revision")],
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
) -> None:
    """Publish an older tagged tree again as a new revision."""
    from cvmfs_ml.publish.repository import Publisher

    result = Publisher.open(repo, keys).rollback(tag)
    typer.echo(f"revision {result.revision}: rolled back to {tag}")


@repo_app.command("resign")
@friendly
def repo_resign(
    repo: Annotated[Path, typer.Argument()],
    days: Annotated[int | None, typer.Option(help="validity in days")] = None,
    keys: Annotated[Path | None, typer.Option("--keys")] = None,
) -> None:
    """Sign a fresh whitelist with the master key (before the old one expires)."""
    from cvmfs_ml.publish.repository import Publisher

    publisher = Publisher.open(repo, keys)
    publisher.resign(valid_for=dt.timedelta(days=days) if days else None)
    typer.echo(f"whitelist of {publisher.fqrn} re-signed")
