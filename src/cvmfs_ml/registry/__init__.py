"""The registry service (``cvmfs-ml registry serve``; docs/registry.md).

:mod:`.cid` content IDs; :mod:`.config` the config file and hashed bearer tokens; :mod:`.auth`
who may do what; :mod:`.tarballs` upload checks and unpacking; :mod:`.jobs` the SQLite queue;
:mod:`.worker` one publishing thread per repository (batches, cleanup, Stratum 1 snapshots);
:mod:`.service` what the HTTP layer calls; :mod:`.app` FastAPI (user-pub ``/pubapi/``, JSON
``/api/v1/``, metrics, health); :mod:`.resumable` resumable CID uploads; :mod:`.oci_store` and
:mod:`.oci_api` the OCI distribution endpoints; :mod:`.web` the web page; :mod:`.metrics`,
:mod:`.logs`; :mod:`.wait` ``cvmfs-ml wait``.
"""
