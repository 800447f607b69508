"""The model repository: manifests, verified artifacts and loaded runners."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service import metrics
from service.errors import ModelError, NotFound
from service.inference import tensorrt_runner
from service.inference.manifest import Manifest, ModelVersion, load_manifest
from service.inference.onnx_runner import OnnxRunner, ShapeProfile, default_cache_root, writable_dir
from service.inference.runner import Runner

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class RegisteredModel:
    manifest: Manifest
    folder: Path

    def artifact_path(self, version: ModelVersion) -> Path:
        return self.folder / version.artifact


@dataclass
class ModelRegistry:
    """Models found in a repository folder. Hashes are checked on load; runners are created on first use.

    ``providers`` is the execution-provider order (settings' ``execution_providers``): ONNX Runtime provider names,
    optionally led by ``"TensorRTNative"`` to prefer a native TensorRT plan built for this GPU by
    ``clinfer models build-trt``. Without such a plan (or without tensorrt), the ONNX Runtime providers that follow
    are used, and the runner's ``fallback_reason`` says why.
    """

    root: Path
    providers: list[str]
    cpu_threads: int | None = None
    """intra-op threads of ONNX Runtime's CPU provider; None: the CPUs this process may use."""
    cpu_spin: bool = False
    """let those threads spin between calls (settings' cpu_spin)."""
    trt_fp16: bool = True
    """FP16 for the TensorRT EP and native plans."""
    batch_max_size: int | None = None
    """overrides the manifests' max_batch_size for TensorRT profiles and plans (settings' batch_max_size)."""
    cache_root: Path | None = None
    """where engine caches and plans go when the repository is read-only; None: ``$XDG_CACHE_HOME/clinfer``."""
    models: dict[str, RegisteredModel] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _runners: dict[tuple[str, str], Runner] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        """Read every ``<root>/<name>/manifest.yaml`` and verify each version's artifact hash.

        A model whose manifest is invalid or whose artifact does not match its sha256 is not served; its error
        is kept in ``errors`` (shown by /readyz and ``clinfer models list``).
        """
        self.models.clear()
        self.errors.clear()
        if not self.root.is_dir():
            self.errors["*"] = f"model repository {self.root} does not exist"
            return
        for manifest_path in sorted(self.root.glob("*/manifest.yaml")):
            name = manifest_path.parent.name
            try:
                manifest = load_manifest(manifest_path)
                if manifest.name != name:
                    raise ModelError(f"manifest name {manifest.name!r} does not match its folder {name!r}")
                model = RegisteredModel(manifest=manifest, folder=manifest_path.parent)
                for version in manifest.versions:
                    verify_artifact(model.artifact_path(version), version.sha256)
                self.models[name] = model
            except ModelError as e:
                self.errors[name] = e.message
                log.error("model %s not served: %s", name, e.message)

    def get_or_raise(self, name: str) -> RegisteredModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(
                f"model {name} is not in the repository" + (f": {self.errors[name]}" if name in self.errors else "")
            )
        return model

    def version_or_raise(self, name: str, version: str) -> tuple[RegisteredModel, ModelVersion]:
        model = self.get_or_raise(name)
        for candidate in model.manifest.versions:
            if candidate.version == version:
                return model, candidate
        raise NotFound(f"model {name} has no version {version}")

    def max_batch(self, manifest: Manifest) -> int:
        """The largest batch a runner of this model must accept."""
        return self.batch_max_size or manifest.batching.max_batch_size

    def version_dir(self, name: str, version: str) -> Path:
        """``<repository>/<name>/<version>/``: where the artifact is, and where plans go when it is writable."""
        model, model_version = self.version_or_raise(name, version)
        return model.artifact_path(model_version).parent

    def fallback_dir(self, name: str, version: str) -> Path:
        """``<cache root>/<name>/<version>/``: plans and engine caches when the repository is read-only."""
        return (self.cache_root or default_cache_root()) / name / version

    def writable_version_dir(self, name: str, version: str) -> Path:
        return writable_dir(self.version_dir(name, version), fallback=self.fallback_dir(name, version))

    def runner(self, name: str, version: str) -> Runner:
        """The loaded runner of a model version, created on first use (see the class's note on providers).

        Raises:
            NotFound: no such model or version.
            ModelError: the model cannot be loaded on any provider.
        """
        with self._lock:
            key = (name, version)
            if key not in self._runners:
                runner = self._create_runner(name, version)
                self._runners[key] = runner
                metrics.MODEL_LOADED.labels(name, version, runner.provider).set(1)
            return self._runners[key]

    def loaded(self) -> dict[tuple[str, str], str]:
        """The model versions loaded in this process (name, version), each with its execution provider."""
        with self._lock:
            return {key: runner.provider for key, runner in self._runners.items()}

    def unload(self, name: str, version: str) -> bool:
        """Close a loaded runner so that its (device) memory is freed; the next ``runner`` call loads it again.

        Returns:
            Whether a runner was loaded.
        """
        with self._lock:
            runner = self._runners.pop((name, version), None)
        if runner is None:
            return False
        metrics.MODEL_LOADED.remove(name, version, runner.provider)
        close = getattr(runner, "close", None)
        if callable(close):
            close()
        return True

    def _create_runner(self, name: str, version: str) -> Runner:
        model, model_version = self.version_or_raise(name, version)
        native_reason: str | None = None
        if tensorrt_runner.NATIVE in self.providers[1:]:
            log.warning("%s is only honoured first in the execution providers; ignored", tensorrt_runner.NATIVE)
        if self.providers[:1] == [tensorrt_runner.NATIVE]:
            try:
                return self._native_runner(model, model_version)
            except ModelError as e:
                native_reason = f"{tensorrt_runner.NATIVE}: {e.message}"
                log.warning("%s %s: no native TensorRT runner (%s); using ONNX Runtime", name, version, e.message)
        max_batch = self.max_batch(model.manifest)
        opt_batch = min(model.manifest.batching.preferred_batch_size, max_batch)
        profile: ShapeProfile = {
            input_name: ((1, *shape), (opt_batch, *shape), (max_batch, *shape))
            for input_name, shape in tensorrt_runner.manifest_input_shapes(model.manifest).items()
        }
        runner = OnnxRunner(
            model.artifact_path(model_version),
            providers=[p for p in self.providers if p != tensorrt_runner.NATIVE],
            cpu_threads=self.cpu_threads,
            cpu_spin=self.cpu_spin,
            trt_fp16=self.trt_fp16,
            trt_cache_dir=self.version_dir(name, version) / "trt-cache",
            cache_root=self.cache_root,
            trt_profile=profile,
        )
        if native_reason is not None:
            runner.fallback_reason = "; ".join(r for r in (native_reason, runner.fallback_reason) if r)
        return runner

    def _native_runner(self, model: RegisteredModel, model_version: ModelVersion) -> tensorrt_runner.TensorRTRunner:
        name, version = model.manifest.name, model_version.version
        file_name = tensorrt_runner.local_plan_name(
            model.manifest, fp16=self.trt_fp16, max_batch=self.max_batch(model.manifest)
        )
        for folder in (self.version_dir(name, version), self.fallback_dir(name, version)):
            if (folder / file_name).is_file():
                return tensorrt_runner.TensorRTRunner(folder / file_name, model.manifest)
        raise ModelError(
            f"no plan {file_name} for this GPU in {self.version_dir(name, version)} or "
            f"{self.fallback_dir(name, version)}; build it with `clinfer models build-trt {name} --version {version}`"
        )


def verify_artifact(path: Path, expected_sha256: str) -> None:
    """Refuse an artifact that is missing or whose content does not match the manifest's sha256."""
    if not path.is_file():
        raise ModelError(f"artifact {path} is missing")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelError(
            f"artifact {path} has sha256 {actual}, but its manifest says {expected_sha256}: refusing to serve it"
        )
