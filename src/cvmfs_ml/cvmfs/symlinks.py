"""Variant symlinks: ``$(VAR)`` and ``$(VAR:-default)`` in link targets (cvmfs-format.md §4.3).

Upstream's client expands them every time it reads a catalog row (``SqlDirent::ExpandSymlink``)
from the environment of the ``cvmfs2`` process, which also holds every parameter of the client
configuration (the options parser exports them). The rules, as upstream applies them:

* ``$(NAME)`` is replaced by the value of ``NAME``; a set but empty variable gives ``""``;
* ``$(NAME:-default)`` gives ``default`` when ``NAME`` is not set (a set, empty one gives ``""``);
* an unset ``NAME`` without a default gives ``""``;
* ``$(`` without a closing ``)`` is kept as it is, and so is a ``$`` not followed by ``(``;
* there is no nesting and no escaping: the first ``)`` ends the reference.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["expand_variant_symlink", "is_variant_symlink"]


def is_variant_symlink(target: str) -> bool:
    """Whether ``target`` holds a ``$(...)`` reference that expansion would change."""
    start = target.find("$(")
    return start >= 0 and target.find(")", start + 2) >= 0


def expand_variant_symlink(target: str, variables: Mapping[str, str]) -> str:
    """``target`` with every ``$(NAME)`` / ``$(NAME:-default)`` replaced from ``variables``."""
    if "$(" not in target:
        return target
    out: list[str] = []
    pos = 0
    while True:
        start = target.find("$(", pos)
        if start < 0:
            break
        end = target.find(")", start + 2)
        if end < 0:
            break  # no closing parenthesis: the rest stays as it is
        out.append(target[pos:start])
        name, separator, default = target[start + 2 : end].partition(":-")
        value = variables.get(name)
        out.append(value if value is not None else (default if separator else ""))
        pos = end + 1
    out.append(target[pos:])
    return "".join(out)
