"""``python -m cvmfs_ml.cli``."""

from cvmfs_ml.cli import main

main()
