"""Client configuration in upstream's own words (cvmfs-format.md §10.1).

A site's ``/etc/cvmfs/default.local`` or ``config.d/<fqrn>.conf`` must work unchanged, so this
module reads upstream's ``KEY=value`` files and upstream's parameter names. Upstream evaluates
those files with bash (``cvmfs/options.cc``, ``BashOptionsManager::ParsePath``); we do not run a
shell but understand the subset real files use:

* blank lines, ``#`` comments (whole-line, or after whitespace outside quotes);
* ``export KEY=value`` and ``readonly KEY=value``;
* single quotes (literal), double quotes and bare words, concatenated as in the shell;
* ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:=default}``, looked up in the values set
  so far, then in the environment (upstream's ``domain.d/cern.ch.conf`` uses ``${X:=...}``);
* anything else (``if ...; then``, ``fi``, function calls) is skipped, as upstream's key
  extraction skips it.

Precedence, lowest first: upstream's file chain under ``etc_dir`` (only when asked), the files
named by ``CVMFS_ML_CONFIG``, the files given by the caller (``--config``), then the
environment. Only ``CVMFS_*`` keys are taken from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cvmfs_ml.client.trust import MAX_BLACKLIST_BYTES, Blacklist
from cvmfs_ml.errors import ConfigError, CvmfsMlError

__all__ = [
    "DIRECT",
    "ClientConfig",
    "ExternalConfig",
    "default_cache_base",
    "external_config",
    "folder_fqrn",
    "load_blacklist",
    "load_config",
    "parse_config_text",
    "parse_proxy_list",
    "parse_server_urls",
    "upstream_config_files",
]

DIRECT = "DIRECT"
"""The proxy entry meaning "connect to the server without a proxy"."""

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRUE = frozenset({"yes", "on", "1", "true"})
_FALSE = frozenset({"no", "off", "0", "false", ""})


NFILES = 131072
"""Open files a mount's daemon asks for: upstream's ``CVMFS_NFILES`` default (its ``cvmfs2``
raises its limit the same way). A mount serves every job of a node, and each file being read
keeps up to 16 pieces open: 64 sharded files read at once can pass the 1024 a process often
gets."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything the fetcher and the cache need, already validated.

    ``params`` keeps every merged ``KEY=value`` (files and environment) so that layers above can
    read settings this class does not model (``CVMFS_MAX_TTL``, ``CVMFS_ROOT_HASH``...).
    """

    fqrn: str | None
    server_urls: list[str]
    proxy_groups: list[list[str]]
    public_keys: list[Path]
    cache_base: Path
    cache_dir: Path
    shared_cache: bool = True
    quota_limit_mb: int | None = 4000
    timeout: float = 5.0
    timeout_direct: float = 10.0
    max_retries: int = 1
    backoff_init: float = 2.0
    backoff_max: float = 10.0
    low_speed_limit: int = 1024
    proxy_reset_after: float = 300.0
    host_reset_after: float = 1800.0
    follow_redirects: bool = False
    parallel: int = 8
    nfiles: int = NFILES
    params: dict[str, str] = field(default_factory=dict, repr=False)
    sources: list[Path] = field(default_factory=list)

    @property
    def quota_bytes(self) -> int | None:
        """The cache quota in bytes (``None`` = unlimited, upstream's ``CVMFS_QUOTA_LIMIT=-1``)."""
        return None if self.quota_limit_mb is None else self.quota_limit_mb * 1024 * 1024


# --------------------------------------------------------------------------- file syntax


def _expand(text: str, lookup: dict[str, str], what: str) -> str:
    """Expand ``$VAR`` / ``${VAR}`` / ``${VAR:-x}`` / ``${VAR:=x}`` in one (unquoted) word."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        if text.startswith("${", i):
            end = _matching_brace(text, i + 2)
            if end < 0:
                raise ConfigError(f"{what}: unterminated ${{...}} in {text!r}")
            inner = text[i + 2 : end]
            out.append(_expand_braced(inner, lookup, what))
            i = end + 1
            continue
        match = _KEY.match(text, i + 1)
        if match is None:
            out.append("$")
            i += 1
            continue
        out.append(lookup.get(match.group(0), ""))
        i = match.end()
    return "".join(out)


def _matching_brace(text: str, start: int) -> int:
    depth = 1
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _expand_braced(inner: str, lookup: dict[str, str], what: str) -> str:
    match = _KEY.match(inner)
    if match is None:
        raise ConfigError(f"{what}: unsupported expansion ${{{inner}}}")
    name, rest = match.group(0), inner[match.end() :]
    current = lookup.get(name, "")
    if not rest:
        return current
    for op in (":-", ":=", "-", "="):
        if rest.startswith(op):
            default = _unquote(rest[len(op) :], lookup, what)
            unset = name not in lookup or (op.startswith(":") and current == "")
            if not unset:
                return current
            if op.endswith("="):
                lookup[name] = default
            return default
    raise ConfigError(f"{what}: unsupported expansion ${{{inner}}}")


def _unquote(value: str, lookup: dict[str, str], what: str) -> str:
    """Shell-like word: concatenated quoted and bare parts, expanding outside single quotes."""
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "'":
            end = value.find("'", i + 1)
            if end < 0:
                raise ConfigError(f"{what}: unterminated single quote")
            out.append(value[i + 1 : end])
            i = end + 1
        elif ch == '"':
            j = i + 1
            while j < len(value) and value[j] != '"':
                j += 2 if value[j] == "\\" else 1
            if j >= len(value):
                raise ConfigError(f"{what}: unterminated double quote")
            out.append(_expand(value[i + 1 : j], lookup, what))
            i = j + 1
        else:
            j = i
            while j < len(value) and value[j] not in "'\"":
                if value.startswith("${", j):
                    end = _matching_brace(value, j + 2)
                    j = len(value) if end < 0 else end + 1
                    continue
                j += 2 if value[j] == "\\" else 1
            out.append(_expand(value[i:j], lookup, what))
            i = j
    return "".join(out)


def _strip_comment(line: str) -> str:
    """Drop a ``#`` comment that starts a word outside quotes (as the shell does)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse_config_text(
    text: str,
    lookup: Mapping[str, str] | None = None,
    source: str = "<config>",
) -> dict[str, str]:
    """Parse upstream ``KEY=value`` text into the keys it sets, in file order.

    ``lookup`` holds the variables visible to ``$VAR`` (earlier files, then the environment);
    it is not modified. Lines that are not assignments are skipped, as upstream skips them.
    """
    scope = dict(lookup or {})
    result: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        for prefix in ("export ", "readonly ", "declare -x ", "declare -r "):
            if line.startswith(prefix):
                line = line[len(prefix) :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            continue
        value = value.strip()
        if value and value.split()[0] != value and value[0] not in "'\"":
            # ``KEY=a b`` runs command ``b`` with KEY in its environment: not a setting.
            continue
        parsed = _unquote(value, scope, f"{source}:{number}: {key}")
        scope[key] = parsed
        result[key] = parsed
    # ``${X:=default}`` assigns X as a side effect, like bash does.
    for key, value in scope.items():
        if key not in result and (lookup is None or lookup.get(key) != value):
            result[key] = value
    return result


# --------------------------------------------------------------------------- values


def parse_server_urls(value: str, fqrn: str | None) -> list[str]:
    """``CVMFS_SERVER_URL``: ``;``-separated URL prefixes with ``@fqrn@`` / ``@org@`` replaced."""
    urls: list[str] = []
    for entry in value.split(";"):
        url = entry.strip()
        if not url:
            continue
        if "@fqrn@" in url or "@org@" in url:
            if not fqrn:
                raise ConfigError(
                    f"CVMFS_SERVER_URL: {url!r} uses @fqrn@/@org@ but no repository name was given"
                )
            url = url.replace("@fqrn@", fqrn).replace("@org@", fqrn.split(".", 1)[0])
        if "://" not in url:
            raise ConfigError(f"CVMFS_SERVER_URL: {url!r} is not a URL (http://host/cvmfs/...)")
        urls.append(url.rstrip("/"))
    return urls


def _with_scheme(proxy: str) -> str:
    return proxy if proxy == DIRECT or "://" in proxy else "http://" + proxy


def parse_proxy_list(value: str, key: str = "CVMFS_HTTP_PROXY") -> list[list[str]]:
    """``;``-separated groups of ``|``-separated proxies; ``DIRECT`` stays the literal string.

    A missing scheme becomes ``http://`` (upstream ``dns::AddDefaultScheme``). Empty entries are
    dropped; upstream reads an empty entry as DIRECT, which we require to be spelled out so that a
    trailing ``;`` never sends a farm's traffic straight to the Stratum 1. ``auto`` (WPAD/PAC)
    needs a network lookup we do not do, so it is refused.
    """
    groups: list[list[str]] = []
    for raw_group in value.split(";"):
        group: list[str] = []
        for raw in raw_group.split("|"):
            proxy = raw.strip()
            if not proxy:
                continue
            if proxy.lower() == "auto":
                raise ConfigError(f"{key}: 'auto' (WPAD) is not supported; list the proxies")
            if proxy.upper() == DIRECT:
                proxy = DIRECT
            group.append(_with_scheme(proxy))
        if group:
            groups.append(group)
    return groups


def _proxy_groups(
    params: Mapping[str, str],
    key: str = "CVMFS_HTTP_PROXY",
    fallback_key: str = "CVMFS_FALLBACK_PROXY",
) -> list[list[str]]:
    """The proxy chain after ``CVMFS_FALLBACK_PROXY`` (download.cc ``SetProxyChain``); the
    ``CVMFS_EXTERNAL_`` pair for external data is built the same way."""
    regular = parse_proxy_list(params.get(key, ""), key)
    fallback = parse_proxy_list(params.get(fallback_key, ""), fallback_key)
    fallback = [[p for p in g if p != DIRECT] for g in fallback]
    fallback = [g for g in fallback if g]
    if fallback:
        regular = [[p for p in g if p != DIRECT] for g in regular]
        regular = [g for g in regular if g]
    groups = regular + fallback
    return groups or [[DIRECT]]


def _number(params: Mapping[str, str], key: str, default: float, minimum: float) -> float:
    text = params.get(key, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a number") from None
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"{key}: {text!r} must be at least {minimum:g}")
    return value


def _integer(params: Mapping[str, str], key: str, default: int, minimum: int) -> int:
    text = params.get(key, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{key}: {value} must be at least {minimum}")
    return value


def _boolean(params: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in params:
        return default
    text = params[key].strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{key}: {params[key]!r} is not yes/no")


def _public_keys(params: Mapping[str, str], etc_dir: Path | None) -> list[Path]:
    """``CVMFS_PUBLIC_KEY`` wins, then every ``*.pub`` in ``CVMFS_KEYS_DIR`` (mountpoint.cc)."""
    if params.get("CVMFS_PUBLIC_KEY", "").strip():
        keys = [Path(p).expanduser() for p in params["CVMFS_PUBLIC_KEY"].split(":") if p.strip()]
        for key in keys:
            if not key.is_file():
                raise ConfigError(f"CVMFS_PUBLIC_KEY: {key} is not a file")
        return keys
    keys_dir_text = params.get("CVMFS_KEYS_DIR", "").strip()
    if keys_dir_text:
        keys_dir = Path(keys_dir_text).expanduser()
        if not keys_dir.is_dir():
            raise ConfigError(f"CVMFS_KEYS_DIR: {keys_dir} is not a directory")
        return sorted(keys_dir.glob("*.pub"))
    if etc_dir is not None and (etc_dir / "keys").is_dir():
        return sorted((etc_dir / "keys").glob("*.pub"))
    return []


def default_cache_base(env: Mapping[str, str]) -> Path:
    """This user's cache folder when no configuration names one (``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``cvmfs-ml``): never a folder other users write to."""
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "cvmfs-ml"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ExternalConfig:
    """Where external files (catalog flag 128) come from: upstream's ``CVMFS_EXTERNAL_*``."""

    urls: str
    proxy_groups: list[list[str]]
    timeout: float = 5.0
    timeout_direct: float = 10.0


def external_config(params: Mapping[str, str]) -> ExternalConfig | None:
    """``CVMFS_EXTERNAL_URL`` with its proxies (``CVMFS_EXTERNAL_HTTP_PROXY``, then
    ``CVMFS_EXTERNAL_FALLBACK_PROXY``) and ``CVMFS_EXTERNAL_TIMEOUT(_DIRECT)``; None if unset."""
    urls = params.get("CVMFS_EXTERNAL_URL", "").strip()
    if not urls:
        return None
    return ExternalConfig(
        urls=urls,
        proxy_groups=_proxy_groups(
            params, "CVMFS_EXTERNAL_HTTP_PROXY", "CVMFS_EXTERNAL_FALLBACK_PROXY"
        ),
        timeout=_number(params, "CVMFS_EXTERNAL_TIMEOUT", 5.0, 0.001),
        timeout_direct=_number(params, "CVMFS_EXTERNAL_TIMEOUT_DIRECT", 10.0, 0.001),
    )


def upstream_config_files(fqrn: str | None, etc_dir: Path = Path("/etc/cvmfs")) -> list[Path]:
    """Upstream's configuration chain, in reading order, that exists under ``etc_dir``.

    Mirrors ``OptionsManager::ParseDefault`` (cvmfs/options.cc) without the config repository:
    ``default.conf``, ``default.d/*.conf``, ``default.local``, ``domain.d/<domain>.conf|.local``,
    ``config.d/<fqrn>.conf|.local``.
    """
    chain = [etc_dir / "default.conf"]
    chain += sorted((etc_dir / "default.d").glob("*.conf"))
    chain.append(etc_dir / "default.local")
    if fqrn and "." in fqrn:
        domain = fqrn.split(".", 1)[1]
        chain += [etc_dir / "domain.d" / f"{domain}.conf", etc_dir / "domain.d" / f"{domain}.local"]
        chain += [etc_dir / "config.d" / f"{fqrn}.conf", etc_dir / "config.d" / f"{fqrn}.local"]
    return [p for p in chain if p.is_file()]


def load_config(
    fqrn: str | None,
    files: Sequence[Path | str] = (),
    env: Mapping[str, str] = os.environ,
    *,
    etc_dir: Path | None = None,
) -> ClientConfig:
    """Merge configuration files and the environment into a validated :class:`ClientConfig`.

    ``fqrn`` may be ``None`` when the caller has a URL rather than a repository name; then
    ``@fqrn@`` in ``CVMFS_SERVER_URL`` is an error. ``etc_dir`` (e.g. ``/etc/cvmfs``) reads
    upstream's chain first; it is off by default so that results depend only on the arguments.
    A file named explicitly (in ``files`` or ``CVMFS_ML_CONFIG``) must exist.
    """
    chain: list[Path] = []
    if etc_dir is not None:
        chain += upstream_config_files(fqrn, etc_dir)
    named = [Path(p) for p in env.get("CVMFS_ML_CONFIG", "").split(os.pathsep) if p.strip()]
    named += [Path(p) for p in files]
    for path in named:
        if not path.expanduser().is_file():
            raise ConfigError(f"configuration file {path} does not exist")
    chain += [p.expanduser() for p in named]

    params: dict[str, str] = {}
    scope: dict[str, str] = dict(env)
    if fqrn:
        scope["CVMFS_FQRN"] = fqrn
    for path in chain:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
        found = parse_config_text(text, {**scope, **params}, str(path))
        params.update(found)
    params.update({k: v for k, v in env.items() if k.startswith("CVMFS_")})
    return _build(fqrn, params, env, etc_dir, chain)


def _build(
    fqrn: str | None,
    params: dict[str, str],
    env: Mapping[str, str],
    etc_dir: Path | None,
    sources: list[Path],
) -> ClientConfig:
    base_text = params.get("CVMFS_CACHE_BASE", "").strip()
    cache_base = Path(base_text).expanduser() if base_text else default_cache_base(env)
    shared = _boolean(params, "CVMFS_SHARED_CACHE", True)
    dir_text = params.get("CVMFS_CACHE_DIR", "").strip()
    if dir_text:
        cache_dir = Path(dir_text).expanduser()
    elif shared or not fqrn:
        cache_dir = cache_base / "shared"
    else:
        cache_dir = cache_base / fqrn

    quota = _integer(params, "CVMFS_QUOTA_LIMIT", 4000, -1)
    backoff_init = _number(params, "CVMFS_BACKOFF_INIT", 2.0, 0.0)
    backoff_max = _number(params, "CVMFS_BACKOFF_MAX", 10.0, 0.0)
    if backoff_max < backoff_init:
        raise ConfigError(
            f"CVMFS_BACKOFF_MAX: {backoff_max:g} is below CVMFS_BACKOFF_INIT {backoff_init:g}"
        )
    return ClientConfig(
        fqrn=fqrn,
        server_urls=parse_server_urls(params.get("CVMFS_SERVER_URL", ""), fqrn),
        proxy_groups=_proxy_groups(params),
        public_keys=_public_keys(params, etc_dir),
        cache_base=cache_base,
        cache_dir=cache_dir,
        shared_cache=shared,
        quota_limit_mb=None if quota < 0 else quota,
        timeout=_number(params, "CVMFS_TIMEOUT", 5.0, 0.001),
        timeout_direct=_number(params, "CVMFS_TIMEOUT_DIRECT", 10.0, 0.001),
        max_retries=_integer(params, "CVMFS_MAX_RETRIES", 1, 0),
        backoff_init=backoff_init,
        backoff_max=backoff_max,
        low_speed_limit=_integer(params, "CVMFS_LOW_SPEED_LIMIT", 1024, 0),
        proxy_reset_after=_number(params, "CVMFS_PROXY_RESET_AFTER", 300.0, 0.0),
        host_reset_after=_number(params, "CVMFS_HOST_RESET_AFTER", 1800.0, 0.0),
        follow_redirects=_boolean(params, "CVMFS_FOLLOW_REDIRECTS", False),
        parallel=_integer(params, "CVMFS_ML_PARALLEL", 8, 1),
        nfiles=_integer(params, "CVMFS_NFILES", NFILES, 64),
        params=params,
        sources=sources,
    )


DEFAULT_BLACKLIST = Path("/etc/cvmfs/blacklist")
"""Where upstream's client reads the certificate blacklist (mountpoint.cc, kDefaultBlacklist)."""


def load_blacklist(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ
) -> Blacklist:
    """The site blacklist: ``path``, else ``CVMFS_BLACKLIST``, else ``/etc/cvmfs/blacklist``.

    A file named explicitly (``--blacklist``, ``CVMFS_BLACKLIST``) must exist; upstream's
    default place is read when it exists and is empty otherwise.
    """
    named = os.fspath(path) if path is not None else env.get("CVMFS_BLACKLIST", "").strip()
    where = Path(named).expanduser() if named else DEFAULT_BLACKLIST
    try:
        with where.open("rb") as handle:
            data = handle.read(MAX_BLACKLIST_BYTES + 1)
    except FileNotFoundError:
        if named:
            raise ConfigError(
                f"blacklist {where} does not exist (CVMFS_BLACKLIST, --blacklist)"
            ) from None
        return Blacklist()
    except OSError as exc:
        raise ConfigError(f"cannot read the blacklist {where}: {exc}") from exc
    try:
        return Blacklist.parse(data, str(where))
    except CvmfsMlError as exc:
        raise ConfigError(str(exc)) from exc


def folder_fqrn(folder: str | os.PathLike[str]) -> str:
    """The repository a folder stands for: its own name, as given (a symlink named after the
    repository counts, not its target). Never the ``N`` of the manifest inside, which is what
    gets verified against this name."""
    return Path(os.path.abspath(folder)).name
