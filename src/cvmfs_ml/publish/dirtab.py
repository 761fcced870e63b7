"""``/.cvmfsdirtab``: which directories become nested catalogs (cvmfs-format.md §8.1).

One pattern per line; ``#`` comments and blank lines are ignored; leading spaces skipped. Positive
rules are absolute globs whose ``*`` and ``?`` stay inside one path component; negative rules
(``!``) may cross ``/`` with ``*``. A directory gets a catalog if a positive rule matches it and
no negative rule does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cvmfs_ml.errors import FormatError

__all__ = ["Dirtab"]


def _glob_to_regex(pattern: str, *, relaxed: bool) -> re.Pattern[str]:
    out = []
    for char in pattern:
        if char == "*":
            out.append(".*" if relaxed else "[^/]*")
        elif char == "?":
            out.append("." if relaxed else "[^/]")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Dirtab:
    positive: tuple[re.Pattern[str], ...]
    negative: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, text: str) -> Dirtab:
        positive, negative, seen_pos, seen_neg = [], [], set(), set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.lstrip().split("#", 1)[0].rstrip()
            if not line:
                continue
            if line.startswith("!"):
                rule = line[1:].strip()
                seen_neg.add(rule)
                negative.append(_glob_to_regex(rule, relaxed=True))
            else:
                if not line.startswith("/"):
                    raise FormatError(".cvmfsdirtab", f"line {number}: {line!r} is not absolute")
                seen_pos.add(line.rstrip("/"))
                positive.append(_glob_to_regex(line.rstrip("/"), relaxed=False))
        if seen_pos & seen_neg:
            raise FormatError(
                ".cvmfsdirtab", f"rules both positive and negative: {seen_pos & seen_neg}"
            )
        return cls(tuple(positive), tuple(negative))

    def matches(self, path: str) -> bool:
        """Whether the directory ``path`` (``/a/b``) should be a nested catalog root."""
        name = path.rsplit("/", 1)[-1]
        if name in (".", ".."):
            return False
        if not any(p.match(path) for p in self.positive):
            return False
        return not any(n.match(path) for n in self.negative)
