"""The model repository: manifests, verified artifacts and loaded runners."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ModelError, NotFound
from service.inference.manifest import Manifest, ModelVersion, load_manifest
from service.inference.onnx_runner import OnnxRunner

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
    """Models found in a repository folder. Hashes are checked on load; runners are created on first use."""

    root: Path
    providers: list[str]
    models: dict[str, RegisteredModel] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    _runners: dict[tuple[str, str], OnnxRunner] = field(default_factory=dict)
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

    def runner(self, name: str, version: str) -> OnnxRunner:
        with self._lock:
            key = (name, version)
            if key not in self._runners:
                model, model_version = self.version_or_raise(name, version)
                self._runners[key] = OnnxRunner(model.artifact_path(model_version), providers=self.providers)
            return self._runners[key]


def verify_artifact(path: Path, expected_sha256: str) -> None:
    """Refuse an artifact that is missing or whose content does not match the manifest's sha256."""
    if not path.is_file():
        raise ModelError(f"artifact {path} is missing")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ModelError(
            f"artifact {path} has sha256 {actual}, but its manifest says {expected_sha256}: refusing to serve it"
        )
