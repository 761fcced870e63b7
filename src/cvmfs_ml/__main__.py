"""``python -m cvmfs_ml``: the ``cvmfs-ml`` command, for environments without the script."""

from cvmfs_ml.cli import main

main()
