"""JSON from outside: :func:`loads` is :func:`json.loads` whose every failure is a ValueError.

``json.loads`` of a document nested a few thousand levels deep (``[[[[...``, a few kB) raises
``RecursionError``, which is no ``ValueError``: the handlers written for malformed JSON let it
through, so a webhook body, a registry's answer, an uploaded manifest or a repository's
``model.json`` could stop a sync round, a request or a command with a traceback. Here it becomes
:class:`json.JSONDecodeError` (a ``ValueError``), which every one of them already handles.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def loads(data: bytes | bytearray | str) -> Any:
    """:func:`json.loads`, with nesting too deep for the parser reported as malformed JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", "", 0) from None
