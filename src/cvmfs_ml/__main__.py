"""``python -m cvmfs_ml`` (the same as the ``cvmfs-ml`` command)."""

from cvmfs_ml.cli import main

main()
