"""cvmfs."""
