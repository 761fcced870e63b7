"""Run ``cvmfs-ml ARGS`` as if only the base install were present (no optional extras).

``python tests/integrations/base_install.py ARGS...`` refuses to import any module of a
distribution named only in ``pyproject.toml``'s optional dependencies (onnx, onnxruntime,
pyfuse3, kserve, mlflow, boto3, yaml, ...), then runs the CLI. The initializer image
(``deploy/kserve/Containerfile``) installs the wheel without extras; this proves the command
it runs needs nothing more, without building the image.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def extras_only_modules() -> set[str]:
    """Top-level import names of distributions in the extras but not in the base install."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in requirements}  # fmt: skip

    base = names(project["dependencies"])
    extra = set().union(*(names(reqs) for reqs in project["optional-dependencies"].values()))
    extra -= base | {"cvmfs-ml"}
    modules: set[str] = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in extra for d in dists):
            modules.add(module)
    return modules


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname.partition(".")[0] in self.blocked:
            raise ImportError(f"{fullname} is not part of the base install")


if __name__ == "__main__":
    sys.meta_path.insert(0, _Refuse(extras_only_modules()))
    from cvmfs_ml.cli import main

    sys.argv = ["cvmfs-ml", *sys.argv[1:]]
    main()
