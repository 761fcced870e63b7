"""Models in CVMFS for the serving and tracking tools around them (docs/integrations.md).

* :mod:`.kserve`: the KServe storage initializer for ``cvmfs://`` (``cvmfs-ml kserve-init``);
* :mod:`.kserve_server`: a KServe ``ModelServer`` model serving ONNX from CVMFS, following an alias;
* :mod:`.kserve_process`: run that server as a process and send it v2 requests;
* :mod:`.kserve_stock`: KServe's stock download (``kserve_storage``) as a process, to compare;
* :mod:`.mlflow_artifacts`: MLflow's ``cvmfs://`` artifact repository (read-only).

References to model versions (``cvmfs://<fqrn>/<ns>/<name>:<alias>``) and local folders for them
live one layer down, in :mod:`cvmfs_ml.models.refs`.
"""
