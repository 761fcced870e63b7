"""Client configuration: upstream's file syntax, parameters, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmfs_ml.client.config import (
    DIRECT,
    load_config,
    parse_config_text,
    parse_proxy_list,
    parse_server_urls,
    upstream_config_files,
)
from cvmfs_ml.errors import ConfigError

REF_KEYS = Path("/work/shared/fixtures/cvmfs-reference-repo/keys")

# /etc/cvmfs/default.conf as shipped by upstream (abridged, same constructs)
UPSTREAM_DEFAULT_CONF = """\
# Don't edit here.  Create /etc/cvmfs/default.local.
# As a rule of thumb, overwrite only parameters you find in here.
CVMFS_CACHE_BASE=/var/lib/cvmfs
CVMFS_QUOTA_LIMIT=4000
CVMFS_TIMEOUT=5
CVMFS_TIMEOUT_DIRECT=10
CVMFS_SHARED_CACHE=yes
CVMFS_PROXY_RESET_AFTER=300
CVMFS_HOST_RESET_AFTER=1800
CVMFS_MAX_RETRIES=1
CVMFS_BACKOFF_INIT=2
CVMFS_BACKOFF_MAX=10
CVMFS_SEND_INFO_HEADER=no
CVMFS_LOW_SPEED_LIMIT=1024
if [ "x$CVMFS_BASE_ENV" = "x" ]; then
  readonly CVMFS_USER=cvmfs
  readonly CVMFS_MOUNT_DIR=/cvmfs
  readonly CVMFS_BASE_ENV=1
fi
"""

# /etc/cvmfs/domain.d/cern.ch.conf as shipped by upstream (abridged)
UPSTREAM_CERN_CONF = """\
# Stratum 1 servers for the cern.ch domain
CVMFS_SERVER_URL=${CVMFS_SERVER_URL:="http://cvmfs-stratum-one.cern.ch/cvmfs/@fqrn@;http://cernvmfs.gridpp.rl.ac.uk/cvmfs/@fqrn@;http://cvmfs-s1bnl.opensciencegrid.org/cvmfs/@fqrn@"}
CVMFS_KEYS_DIR=/etc/cvmfs/keys/cern.ch
CVMFS_USE_GEOAPI=yes
"""

# the example default.local from upstream's documentation
UPSTREAM_DEFAULT_LOCAL = """\
CVMFS_REPOSITORIES=atlas.cern.ch,atlas-condb.cern.ch,grid.cern.ch
CVMFS_HTTP_PROXY="http://squid1.example.org:3128|http://squid2.example.org:3128;DIRECT"
CVMFS_QUOTA_LIMIT=20000
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- syntax


def test_upstream_default_conf_parses_and_skips_shell_control() -> None:
    params = parse_config_text(UPSTREAM_DEFAULT_CONF)
    assert params["CVMFS_CACHE_BASE"] == "/var/lib/cvmfs"
    assert params["CVMFS_BACKOFF_MAX"] == "10"
    assert params["CVMFS_USER"] == "cvmfs"  # `readonly` stripped, as upstream does
    assert not any(key.startswith("if") for key in params)


def test_upstream_domain_conf_default_expansion() -> None:
    params = parse_config_text(UPSTREAM_CERN_CONF)
    urls = params["CVMFS_SERVER_URL"].split(";")
    assert urls[0] == "http://cvmfs-stratum-one.cern.ch/cvmfs/@fqrn@"
    assert len(urls) == 3
    # an already set value wins over the ${X:=default}
    params = parse_config_text(UPSTREAM_CERN_CONF, {"CVMFS_SERVER_URL": "http://mine/cvmfs/@fqrn@"})
    assert params["CVMFS_SERVER_URL"] == "http://mine/cvmfs/@fqrn@"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("K=plain", "plain"),
        ("export K=exported", "exported"),
        ("K='single $HOME ; | #'", "single $HOME ; | #"),
        ('K="double $HOME"', "double /home/u"),
        ('K="${HOME}/x"', "/home/u/x"),
        ("K=$HOME/y", "/home/u/y"),
        ("K=${UNSET:-fallback}", "fallback"),
        ("K=a'b'\"c\"", "abc"),
        ("K=v # trailing comment", "v"),
        ("K=v#kept", "v#kept"),
        ("  K=indented  ", "indented"),
        ("K=", ""),
        ('K="a;b|c"', "a;b|c"),
    ],
)
def test_value_syntax(line: str, value: str) -> None:
    assert parse_config_text(line, {"HOME": "/home/u"})["K"] == value


def test_later_lines_see_earlier_ones_and_override() -> None:
    text = 'A=1\nB="$A-2"\nA=3\nCVMFS_HTTP_PROXY="$CVMFS_HTTP_PROXY;DIRECT"'
    params = parse_config_text(text, {"CVMFS_HTTP_PROXY": "http://p:3128"})
    assert params == {"A": "3", "B": "1-2", "CVMFS_HTTP_PROXY": "http://p:3128;DIRECT"}


def test_non_assignments_are_skipped() -> None:
    text = "# c\n\nfi\nsource /etc/x\nK=a b\nnot a key=1\nOK=1\n"
    assert parse_config_text(text) == {"OK": "1"}


def test_unterminated_quote_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="CVMFS_SERVER_URL"):
        parse_config_text('CVMFS_SERVER_URL="http://x', source="f.conf")


# ---------------------------------------------------------------- values


def test_server_urls_substitute_fqrn_and_org() -> None:
    urls = parse_server_urls(
        "http://s1.example.org/cvmfs/@fqrn@; http://s2.example.org/@org@/cvmfs/@fqrn@/",
        "atlas.cern.ch",
    )
    assert urls == [
        "http://s1.example.org/cvmfs/atlas.cern.ch",
        "http://s2.example.org/atlas/cvmfs/atlas.cern.ch",
    ]


def test_server_url_placeholder_without_fqrn_is_an_error() -> None:
    with pytest.raises(ConfigError, match="CVMFS_SERVER_URL"):
        parse_server_urls("http://s1/cvmfs/@fqrn@", None)
    with pytest.raises(ConfigError, match="CVMFS_SERVER_URL"):
        parse_server_urls("not-a-url", "a.b")


def test_proxy_list_groups_members_direct_and_scheme() -> None:
    groups = parse_proxy_list("squid1:3128|http://squid2:3128;https://p3:3129;direct")
    assert groups == [
        ["http://squid1:3128", "http://squid2:3128"],
        ["https://p3:3129"],
        [DIRECT],
    ]
    assert parse_proxy_list("http://p:1;") == [["http://p:1"]]  # empty entries are dropped
    with pytest.raises(ConfigError, match="CVMFS_HTTP_PROXY"):
        parse_proxy_list("auto;DIRECT")


# ---------------------------------------------------------------- load_config


def test_defaults_without_any_configuration(tmp_path: Path) -> None:
    config = load_config("ref.test.local", env={"HOME": str(tmp_path)})
    assert config.server_urls == []
    assert config.proxy_groups == [[DIRECT]]
    assert config.cache_base == tmp_path / ".cache" / "cvmfs-ml"
    assert config.cache_dir == config.cache_base / "shared"
    assert config.quota_limit_mb == 4000
    assert config.quota_bytes == 4000 * 2**20
    assert (config.timeout, config.timeout_direct, config.max_retries) == (5.0, 10.0, 1)
    assert (config.backoff_init, config.backoff_max) == (2.0, 10.0)
    assert config.follow_redirects is False
    assert config.parallel == 8
    assert config.public_keys == []


def test_upstream_etc_chain_order_and_precedence(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "default.conf", UPSTREAM_DEFAULT_CONF)
    write(etc / "default.d" / "50-site.conf", "CVMFS_QUOTA_LIMIT=1000\n")
    write(etc / "default.local", UPSTREAM_DEFAULT_LOCAL)
    write(etc / "domain.d" / "cern.ch.conf", UPSTREAM_CERN_CONF)
    write(etc / "keys" / "cern.ch" / "cern.ch.pub", "key")
    write(etc / "keys" / "cern.ch" / "cern-it1.cern.ch.pub", "key")
    write(etc / "config.d" / "atlas.cern.ch.conf", "CVMFS_TIMEOUT=7\n")
    write(etc / "config.d" / "atlas.cern.ch.local", "CVMFS_TIMEOUT=8\n")
    chain = upstream_config_files("atlas.cern.ch", etc)
    assert [p.name for p in chain] == [
        "default.conf",
        "50-site.conf",
        "default.local",
        "cern.ch.conf",
        "atlas.cern.ch.conf",
        "atlas.cern.ch.local",
    ]
    text = UPSTREAM_CERN_CONF.replace("/etc/cvmfs/keys/cern.ch", str(etc / "keys" / "cern.ch"))
    write(etc / "domain.d" / "cern.ch.conf", text)
    config = load_config("atlas.cern.ch", env={"HOME": str(tmp_path)}, etc_dir=etc)
    assert config.server_urls[0] == "http://cvmfs-stratum-one.cern.ch/cvmfs/atlas.cern.ch"
    assert config.proxy_groups == [
        ["http://squid1.example.org:3128", "http://squid2.example.org:3128"],
        [DIRECT],
    ]
    assert config.quota_limit_mb == 20000  # default.local after default.d
    assert config.timeout == 8.0  # .local after .conf
    assert config.cache_dir == Path("/var/lib/cvmfs/shared")
    assert [p.name for p in config.public_keys] == ["cern-it1.cern.ch.pub", "cern.ch.pub"]
    assert config.params["CVMFS_USE_GEOAPI"] == "yes"


def test_environment_beats_files_and_files_apply_in_order(tmp_path: Path) -> None:
    first = write(tmp_path / "a.conf", "CVMFS_TIMEOUT=3\nCVMFS_MAX_RETRIES=4\n")
    second = write(tmp_path / "b.conf", "CVMFS_TIMEOUT=6\n")
    env = {"HOME": str(tmp_path), "CVMFS_MAX_RETRIES": "2", "OTHER": "x"}
    config = load_config(None, [first, second], env)
    assert config.timeout == 6.0
    assert config.max_retries == 2
    assert "OTHER" not in config.params
    assert config.sources == [first, second]


def test_cvmfs_ml_config_env_comes_before_explicit_files(tmp_path: Path) -> None:
    from_env = write(tmp_path / "env.conf", "CVMFS_ML_PARALLEL=3\nCVMFS_TIMEOUT=1\n")
    explicit = write(tmp_path / "cli.conf", "CVMFS_TIMEOUT=2\n")
    env = {"HOME": str(tmp_path), "CVMFS_ML_CONFIG": str(from_env)}
    config = load_config(None, [explicit], env)
    assert config.parallel == 3
    assert config.timeout == 2.0


def test_fqrn_is_visible_to_files(tmp_path: Path) -> None:
    conf = write(tmp_path / "c.conf", 'CVMFS_SERVER_URL="http://h/cvmfs/$CVMFS_FQRN"\n')
    config = load_config("ref.test.local", [conf], {"HOME": str(tmp_path)})
    assert config.server_urls == ["http://h/cvmfs/ref.test.local"]


def test_reference_repository_client_config(tmp_path: Path) -> None:
    """The README's upstream client settings for the reference repository."""
    conf = write(
        tmp_path / "ref.test.local.conf",
        "CVMFS_SERVER_URL=http://127.0.0.1:8000/cvmfs/@fqrn@\n"
        "CVMFS_HTTP_PROXY=DIRECT\n"
        f"CVMFS_PUBLIC_KEY={REF_KEYS / 'ref.test.local.pub'}\n",
    )
    config = load_config("ref.test.local", [conf], {"HOME": str(tmp_path)})
    assert config.server_urls == ["http://127.0.0.1:8000/cvmfs/ref.test.local"]
    assert config.proxy_groups == [[DIRECT]]
    assert config.public_keys == [REF_KEYS / "ref.test.local.pub"]


def test_public_key_list_and_keys_dir(tmp_path: Path) -> None:
    a = write(tmp_path / "k" / "a.pub", "a")
    b = write(tmp_path / "k" / "b.pub", "b")
    write(tmp_path / "k" / "notes.txt", "")
    env = {"HOME": str(tmp_path), "CVMFS_PUBLIC_KEY": f"{a}:{b}"}
    assert load_config(None, env=env).public_keys == [a, b]
    env = {"HOME": str(tmp_path), "CVMFS_KEYS_DIR": str(tmp_path / "k")}
    assert load_config(None, env=env).public_keys == [a, b]
    # CVMFS_PUBLIC_KEY wins over CVMFS_KEYS_DIR (mountpoint.cc)
    env["CVMFS_PUBLIC_KEY"] = str(b)
    assert load_config(None, env=env).public_keys == [b]


def test_fallback_proxy_is_appended_and_removes_direct(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "CVMFS_HTTP_PROXY": "http://a:3128|DIRECT;DIRECT",
        "CVMFS_FALLBACK_PROXY": "http://fb1:3128|fb2:3128;DIRECT",
    }
    assert load_config(None, env=env).proxy_groups == [
        ["http://a:3128"],
        ["http://fb1:3128", "http://fb2:3128"],
    ]


def test_cache_dir_per_repository_and_unlimited_quota(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "CVMFS_CACHE_BASE": str(tmp_path / "c"),
        "CVMFS_SHARED_CACHE": "no",
        "CVMFS_QUOTA_LIMIT": "-1",
        "CVMFS_FOLLOW_REDIRECTS": "yes",
        "CVMFS_BACKOFF_INIT": "0.01",
        "CVMFS_BACKOFF_MAX": "0.05",
    }
    config = load_config("ref.test.local", env=env)
    assert config.cache_dir == tmp_path / "c" / "ref.test.local"
    assert config.quota_limit_mb is None and config.quota_bytes is None
    assert config.follow_redirects is True
    assert (config.backoff_init, config.backoff_max) == (0.01, 0.05)
    env["CVMFS_CACHE_DIR"] = str(tmp_path / "exact")
    assert load_config("ref.test.local", env=env).cache_dir == tmp_path / "exact"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CVMFS_QUOTA_LIMIT", "lots"),
        ("CVMFS_QUOTA_LIMIT", "-5"),
        ("CVMFS_TIMEOUT", "0"),
        ("CVMFS_TIMEOUT_DIRECT", "soon"),
        ("CVMFS_MAX_RETRIES", "-1"),
        ("CVMFS_BACKOFF_INIT", "nan"),
        ("CVMFS_FOLLOW_REDIRECTS", "maybe"),
        ("CVMFS_ML_PARALLEL", "0"),
        ("CVMFS_PUBLIC_KEY", "/nonexistent/key.pub"),
        ("CVMFS_KEYS_DIR", "/nonexistent/keys"),
        ("CVMFS_HTTP_PROXY", "auto"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, env={"HOME": str(tmp_path), key: value})


def test_backoff_max_below_init_is_rejected(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CVMFS_BACKOFF_INIT": "5", "CVMFS_BACKOFF_MAX": "1"}
    with pytest.raises(ConfigError, match="CVMFS_BACKOFF_MAX"):
        load_config(None, env=env)


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(None, [tmp_path / "nope.conf"], {"HOME": str(tmp_path)})
    env = {"HOME": str(tmp_path), "CVMFS_ML_CONFIG": str(tmp_path / "gone.conf")}
    with pytest.raises(ConfigError, match=r"gone\.conf"):
        load_config(None, env=env)
