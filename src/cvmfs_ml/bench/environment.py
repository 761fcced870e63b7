"""The benchmark's environment (models, repository, servers, networks) and its worker runs.

:class:`BenchEnvironment` builds the models, publishes them into one repository, serves it
(:class:`~cvmfs_ml.bench.origin.Origin`) and gives each network an endpoint, behind a
:class:`~cvmfs_ml.testing.netem.DelayProxy` and a Squid where asked; :func:`run_worker` runs one
measurement in a fresh :mod:`~cvmfs_ml.bench.worker` process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cvmfs_ml.bench.modes import (
    Endpoint,
    ModeContext,
)
from cvmfs_ml.bench.origin import Origin
from cvmfs_ml.bench.profiles import FQRN, Profile
from cvmfs_ml.bench.zoo import BuiltModel, ModelSpec, build_model, missing_dependency
from cvmfs_ml.errors import ConfigError
from cvmfs_ml.testing.netem import WAN_PROFILES, DelayProxy
from cvmfs_ml.testing.netem import describe as describe_network

__all__ = ["SQUID_MAX_OBJECT_MB", "BenchEnvironment", "run_worker"]

_MiB = 2**20
# The benchmark's Squid must cache whole model files (test Squids default to 1 GiB objects).
SQUID_MAX_OBJECT_MB = 4096


def run_worker(spec: dict[str, Any], scratch: Path, timeout: float) -> tuple[dict[str, Any], float]:
    """Run :mod:`cvmfs_ml.bench.worker` on ``spec``; return (result, wall seconds)."""
    spec_path = scratch / "spec.json"
    result_path = scratch / "result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 1)), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "cvmfs_ml.bench.worker", str(spec_path),
                               str(result_path)], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}, time.perf_counter() - \
            started
    wall = time.perf_counter() - started
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        result = {"ok": False, "error": f"worker exited with {done.returncode}: "
                  + " | ".join(tail)}
    return result, wall


class BenchEnvironment:
    """Models, the published repository, its servers and the per-network endpoints.

    Use as a context manager; everything started is stopped on exit. ``workdir`` is reused
    between runs: models and the repository are rebuilt only when their spec changed.
    """

    def __init__(self, workdir: str | os.PathLike[str], profile: Profile, *,
                 log: Callable[[str], None] = print, global_drop: bool = False,
                 mounted: str | os.PathLike[str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.log = log
        self.global_drop = global_drop
        self.mounted = Path(mounted) if mounted else None
        self.models: dict[str, BuiltModel] = {}
        self.skipped: list[str] = []
        self.publish_seconds: dict[str, float] = {}
        self.origin: Origin | None = None
        self.registry: Any = None
        self._proxies: dict[str, list[DelayProxy]] = {}
        self._registry_proxies: dict[str, DelayProxy] = {}
        self._squids: list[Any] = []
        self.srv = self.workdir / "srv"
        self.keys = self.workdir / "keys"
        self.public_key = self.keys / f"{FQRN}.pub"

    # -- models -------------------------------------------------------------------------------
    def build(self, specs: Sequence[ModelSpec]) -> list[BuiltModel]:
        """Build (or reuse) the models; ones whose packages are missing are skipped and noted."""
        built = []
        for spec in specs:
            if spec.name in self.models:
                built.append(self.models[spec.name])
                continue
            reason = missing_dependency(spec)
            if reason:
                self.skipped.append(f"model {spec.name}: {reason}")
                self.log(f"skip model {spec.name}: {reason}")
                continue
            model = build_model(spec, self.workdir / "models")
            self.log(f"model {spec.name}: {model.files.nbytes / _MiB:.1f} MiB "
                     + ("(reused)" if model.reused else f"(built in {model.build_seconds:.1f} s)"))
            self.models[spec.name] = model
            built.append(model)
        if any(m.spec.kind == "genai" for m in built):
            from cvmfs_ml.bench.genai import gpu_note

            if (note := gpu_note()) not in self.skipped:
                self.skipped.append(note)
        return built

    # -- repository ---------------------------------------------------------------------------
    def publish(self) -> None:
        """Publish every built model at ``/<name>`` (reusing an identical earlier repository)."""
        from cvmfs_ml.cvmfs.objects import Compression
        from cvmfs_ml.publish.repository import Publisher, create_repository
        from cvmfs_ml.publish.settings import PublishSettings

        settings = PublishSettings(compression=Compression(self.profile.compression))
        stamp_path = self.srv / ".bench-publish.json"
        wanted = {"settings": settings.to_conf(),
                  "models": {n: asdict(m.spec) for n, m in self.models.items()}}
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        repo_dir = self.srv / "cvmfs" / FQRN
        if stamp.get("settings") == wanted["settings"] and self.public_key.exists():
            publisher = Publisher.open(repo_dir, self.keys)
            done = stamp.get("models", {})
            self.publish_seconds = dict(stamp.get("seconds", {}))
        else:
            shutil.rmtree(self.srv, ignore_errors=True)
            shutil.rmtree(self.keys, ignore_errors=True)
            (self.srv / "cvmfs").mkdir(parents=True)
            publisher = create_repository(self.srv / "cvmfs", FQRN, keys_dir=self.keys,
                                          settings=settings)
            done = {}
            self.publish_seconds = {}
        for name, model in self.models.items():
            if done.get(name) == asdict(model.spec):
                continue
            self.log(f"publish {name} ({model.files.nbytes / _MiB:.1f} MiB)")
            with publisher.transaction() as txn:
                if name in done:
                    txn.remove(f"/{name}")
                txn.add_folder(model.files.folder, at=f"/{name}")
                result = txn.commit()
            self.publish_seconds[name] = round(result.seconds, 3)
            done[name] = asdict(model.spec)
            self._plain(model)
            stamp_path.write_text(json.dumps({**wanted, "models": done,
                                              "seconds": self.publish_seconds}))
        for model in self.models.values():
            self._plain(model)

    def _plain(self, model: BuiltModel) -> None:
        """Hard links of the plain model folder at ``srv/cvmfs/plain/<name>`` (download mode)."""
        dest = self.srv / "cvmfs" / "plain" / model.name
        for rel in model.files.files:
            target = dest / rel
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(model.files.folder / rel, target)
            except OSError:
                shutil.copy2(model.files.folder / rel, target)

    # -- servers ------------------------------------------------------------------------------
    def start_origin(self) -> Origin:
        if self.origin is None:
            self.origin = Origin(self.srv, self.profile.origin, self.log)
        return self.origin

    def start_registry(self) -> Any:
        if self.registry is None:
            from cvmfs_ml.testing import DockerRegistry

            self.registry = DockerRegistry()
        return self.registry

    def endpoint(self, network: str, *, squid: bool | None = None,
                 registry: bool = False) -> Endpoint:
        """Where clients reach the repository on ``network`` (a delay proxy unless loopback)."""
        origin = self.start_origin()
        if network not in WAN_PROFILES:
            raise ConfigError(f"unknown network {network!r}; known: {sorted(WAN_PROFILES)}")
        reg_host = self.start_registry().host if registry else None
        if WAN_PROFILES[network] is None:
            base = origin.url
        else:
            if network not in self._proxies:
                self._proxies[network] = [
                    DelayProxy.from_profile(network, "127.0.0.1", origin.port).start()]
            base = f"http://127.0.0.1:{self._proxies[network][0].port}"
            if reg_host is not None:  # the registry sits behind the same emulated link
                if network not in self._registry_proxies:
                    self._registry_proxies[network] = DelayProxy.from_profile(
                        network, "127.0.0.1", self.registry.port).start()
                reg_host = f"127.0.0.1:{self._registry_proxies[network].port}"
        squid_url = None
        if squid if squid is not None else self.profile.squid:
            from cvmfs_ml.testing import Squid

            largest = max((m.files.nbytes for m in self.models.values()), default=0)
            proxy = Squid(cache_mem_mb=max(256, int(largest * 1.3 / _MiB)),
                          maximum_object_size_mb=SQUID_MAX_OBJECT_MB)
            self._squids.append(proxy)
            squid_url = proxy.url
        return Endpoint(network, f"{base}/cvmfs/{FQRN}", FQRN, self.public_key,
                        plain_url=f"{base}/cvmfs/plain", proxy=squid_url, registry=reg_host)

    def network_description(self, network: str) -> str:
        text = describe_network(network)
        for proxy in self._proxies.get(network, [])[:1]:
            text += f" ({proxy.describe()})"
        return text

    def mode_context(self, endpoint: Endpoint | None) -> ModeContext:
        return ModeContext(self.workdir, endpoint, global_drop=self.global_drop, log=self.log)

    def close(self) -> None:
        for proxies in self._proxies.values():
            for proxy in proxies:
                proxy.stop()
        self._proxies.clear()
        for proxy in self._registry_proxies.values():
            proxy.stop()
        self._registry_proxies.clear()
        for squid in self._squids:
            squid.close()
        self._squids.clear()
        if self.registry is not None:
            self.registry.close()
            self.registry = None
        if self.origin is not None:
            self.origin.close()
            self.origin = None

    def __enter__(self) -> BenchEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
