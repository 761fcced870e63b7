"""cvmfs-ml: machine-learning models on CernVM-FS, in pure Python.

Layers, each importing only those below it::

    cli
    registry/  integrations/  bench/
    models/
    publish/  client/  replica/
    storage/
    cvmfs/          the format: pure codecs, no network
"""

from cvmfs_ml.errors import CvmfsMlError

__all__ = ["CvmfsMlError", "__version__", "resolve"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``cvmfs_ml.resolve``, imported on first use (it pulls in the client)."""
    if name == "resolve":
        from cvmfs_ml.models.refs import resolve

        return resolve
    raise AttributeError(f"module 'cvmfs_ml' has no attribute {name!r}")
