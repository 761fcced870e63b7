"""The ``--s3-config FILE`` option every command that takes a REPO accepts.

``REPO`` may be ``s3://BUCKET\\[/PREFIX]/FQRN``; the endpoint and credentials come from the file
(upstream's ``KEY=value`` syntax, ``CVMFS_S3_HOST=...``) or, without it, from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["S3ConfigOption", "s3_params"]

S3ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--s3-config",
        help="CVMFS_S3_* settings (KEY=value) for an s3://BUCKET\\[/PREFIX]/FQRN repository; "
        "default: the environment",
    ),
]


def s3_params(config: Path | None) -> dict[str, str] | None:
    """The settings of ``config`` (None: read the environment when the store is opened)."""
    if config is None:
        return None
    import os

    from cvmfs_ml.client.config import parse_config_text
    from cvmfs_ml.errors import ConfigError

    try:
        text = config.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--s3-config {config}: {exc}") from exc
    return parse_config_text(text, dict(os.environ), str(config))
