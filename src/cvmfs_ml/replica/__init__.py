"""Stratum 1 replication: verified, manifest-last copies of a served repository (§11)."""

from cvmfs_ml.replica.sync import SyncReport, sync_replica

__all__ = ["SyncReport", "sync_replica"]
