"""The layers import only downwards, and the format layer never touches the network."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cvmfs_ml"

# Each layer may import itself and the layers listed for it.
ALLOWED = {
    "cvmfs": {"cvmfs", "errors"},
    "storage": {"cvmfs", "errors", "storage"},
    "publish": {"cvmfs", "errors", "storage", "publish"},
    "client": {"cvmfs", "errors", "storage", "client"},
    "replica": {"cvmfs", "errors", "storage", "client", "replica"},
    "models": {"cvmfs", "errors", "storage", "publish", "client", "models"},
    "bench": {"cvmfs", "errors", "storage", "publish", "client", "replica", "models", "bench"},
    "integrations": {"cvmfs", "errors", "storage", "publish", "client", "models", "integrations"},
    "registry": {
        "cvmfs",
        "errors",
        "storage",
        "publish",
        "client",
        "replica",
        "models",
        "registry",
        "sync",  # a pushed container image is published by sync's unpacker
    },
    "sync": {
        "cvmfs",
        "errors",
        "storage",
        "publish",
        "client",
        "replica",
        "models",
        "sync",
    },
}
# The loopback services for tests and benchmarks (cvmfs_ml.testing): they may use the layers
# below, and only bench/ (and tests/) may import them.
ALLOWED["testing"] = {"cvmfs", "errors", "storage", "publish", "client", "testing"}
ALLOWED["bench"].add("testing")
NETWORK_MODULES = {
    "socket",
    "http",
    "urllib",
    "urllib3",
    "httpx",
    "requests",
    "aiohttp",
    "ssl",
    "asyncio",
    "threading",
    "concurrent",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_downwards() -> None:
    problems = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for name in imports_of(path):
                if name.startswith("cvmfs_ml."):
                    target = name.split(".")[1]
                    if target not in allowed:
                        problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert problems == []


def test_only_bench_imports_the_testing_services() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer in ("testing", "bench"):
            continue
        for name in imports_of(path):
            if name == "cvmfs_ml.testing" or name.startswith("cvmfs_ml.testing."):
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert problems == []


def test_format_layer_has_no_network_or_threads() -> None:
    problems = []
    for path in sorted((PACKAGE / "cvmfs").rglob("*.py")):
        for name in imports_of(path):
            if name.split(".")[0] in NETWORK_MODULES - {"threading"}:
                problems.append(f"{path.name} imports {name}")
    assert problems == []


def test_the_check_itself_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom cvmfs_ml.client import repository\n")
    assert imports_of(bad) == {"socket", "cvmfs_ml.client"}
