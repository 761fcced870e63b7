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

__all__ = ["CvmfsMlError", "__version__"]
__version__ = "0.1.0"
