"""JSON from outside: :func:`loads` is :func:`json.loads` whose every failure is a JSONDecodeError.

``json.loads`` of a document nested a few thousand levels deep (``[[[[...``, a few kB) raises
``RecursionError``, which is no ``ValueError``; a number of more than 4300 digits raises a plain
``ValueError`` (Python's limit on converting text to ``int``), and bytes that are not UTF-8 a
``UnicodeDecodeError``. Handlers written for malformed JSON (``except json.JSONDecodeError``) let
those through, so a webhook body, a registry's answer, an uploaded manifest or a repository's
``model.json`` could stop a sync round, a request or a command with a traceback or Python's own
words. Here each becomes :class:`json.JSONDecodeError` (a ``ValueError``) with a plain reason.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["loads"]


def _reason(exc: ValueError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    text = str(exc)
    if "integer string conversion" in text:
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return f"not JSON ({text.splitlines()[0] if text else type(exc).__name__})"


def loads(data: bytes | bytearray | str) -> Any:
    """:func:`json.loads`, every failure reported as :class:`json.JSONDecodeError`."""
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", "", 0) from None
    except ValueError as exc:
        raise json.JSONDecodeError(_reason(exc), "", 0) from None
