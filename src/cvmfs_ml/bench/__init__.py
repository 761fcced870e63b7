"""Building blocks of the benchmark suite (issue 5).

* :mod:`~cvmfs_ml.bench.generators` - models generated from a seed (MLP, LLM-shaped ONNX with
  external data, safetensors, fine-tuned variants) and valid inputs for them.
* :mod:`~cvmfs_ml.bench.physics` - Particle Transformer and ParticleNet (torch + weaver-core).
* :mod:`~cvmfs_ml.bench.caches` - dropping page caches and wiping client caches for cold runs.
* :mod:`~cvmfs_ml.bench.residency` - which pages of a file are cached (mincore).
* :mod:`~cvmfs_ml.bench.heatmap` - access heatmaps, residency strips, trace summaries.

Submodules are not imported here: each pulls in heavy optional dependencies (onnx,
matplotlib, torch) that a caller needing only one of them should not pay for. The loopback
services (nginx, Squid, docker-registry, S3) and the delay proxy that stands in for tc netem
live in :mod:`cvmfs_ml.testing`, shared with the test suite.
"""
