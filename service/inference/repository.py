"""Bring your own model: import an exported ONNX file with a hand-written manifest into the model repository.

An import is checked before anything is written: the manifest must validate, the graph must agree with it and a
smoke inference must pass. Then the artifact is copied to ``<root>/<name>/<version>/model.onnx`` and the manifest is
written with the artifact's sha256 — the registry serves it from the next start of the service.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.errors import ModelError
from service.inference.manifest import Manifest, load_manifest
from service.inference.onnx_runner import OnnxRunner
from service.inference.registry import sha256_of, verify_artifact
from service.inference.validation import ValidationReport, validate

ARTIFACT_NAME = "model.onnx"


@dataclass(frozen=True)
class ImportResult:
    name: str
    version: str
    sha256: str
    path: Path
    report: ValidationReport


def _next_version(existing: Manifest | None) -> str:
    if existing is None:
        return "1"
    numeric = [int(v.version) for v in existing.versions if v.version.isdigit()]
    return str(max(numeric, default=0) + 1)


def _serving_contract(manifest: Manifest) -> dict[str, Any]:
    """What every version of a model shares: the inputs and outputs the service feeds and reads."""
    return manifest.model_dump(include={"image_input", "clinical_input", "outputs"})


def _differences(before: Any, after: Any, path: str = "") -> list[str]:
    """The dotted paths at which two manifest dumps differ (``outputs.findings.0.threshold``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found: list[str] = []
        for key in [*before, *(k for k in after if k not in before)]:
            found += _differences(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [found for i, (b, a) in pairs for found in _differences(b, a, f"{path}.{i}")]
    return [] if before == after else [path]


def _write_text_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _model_card(manifest: Manifest) -> str:
    clinical = manifest.clinical_input.features if manifest.clinical_input else []
    lines = [
        f"# {manifest.name}",
        "",
        "This card was written by `clinfer models import`; replace it with the model's own card.",
        "",
        f"**Intended use:** {manifest.intended_use}",
        "",
        manifest.description,
        "",
        f"- Image input `{manifest.image_input.name}`: {manifest.image_input.shape}",
        f"- Clinical inputs: {', '.join(f.name for f in clinical) or 'none'}",
        f"- Findings: {', '.join(f'{f.display} ({f.code})' for f in manifest.outputs.findings)}",
    ]
    return "\n".join(lines) + "\n"


def import_model(
    root: Path, *, artifact: Path, manifest_file: Path, version: str | None = None, providers: list[str]
) -> ImportResult:
    """Validate and register an exported ONNX model.

    Args:
        root: the model repository.
        artifact: the ONNX file.
        manifest_file: a manifest in the documented format; its ``versions`` may be omitted (the import fills it).
        version: the version to register; default: the next integer.
        providers: ONNX Runtime providers for the smoke inference.

    Raises:
        ModelError: unreadable inputs, an invalid manifest, a graph that disagrees with it, a failed smoke inference,
            an existing version, or a new version whose inputs/outputs differ from the model's earlier versions.
    """
    if not artifact.is_file():
        raise ModelError(f"artifact {artifact} does not exist")
    try:
        raw = yaml.safe_load(manifest_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ModelError(f"cannot read manifest {manifest_file}: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ModelError(f"manifest {manifest_file} must be a mapping with a 'name'")
    name: str = raw["name"]
    folder = root / name
    existing = load_manifest(folder / "manifest.yaml") if (folder / "manifest.yaml").exists() else None
    version = version or _next_version(existing)
    if existing is not None and any(v.version == version for v in existing.versions):
        raise ModelError(f"model {name} already has a version {version}")
    sha256 = sha256_of(artifact)
    entry = {"version": version, "artifact": f"{version}/{ARTIFACT_NAME}", "sha256": sha256}
    previous = [v.model_dump() for v in existing.versions] if existing else []
    try:
        manifest = Manifest.model_validate({**raw, "versions": [*previous, entry]})
    except ValidationError as e:
        raise ModelError(f"manifest {manifest_file} is invalid: {e}") from e
    if existing is not None and (changed := _differences(_serving_contract(existing), _serving_contract(manifest))):
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        raise ModelError(
            f"the manifest differs from {name}'s earlier versions in {shown}. Every version of a model shares its "
            "inputs and outputs, their preprocessing, normalization, thresholds and calibration (one manifest "
            "describes them all, and earlier versions' reports were made with them): import a model that "
            "changes them under a new name"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".import-{uuid.uuid4().hex[:8]}-"))
    try:
        staged = staging / ARTIFACT_NAME
        shutil.copyfile(artifact, staged)
        verify_artifact(staged, sha256)
        report = validate(manifest, OnnxRunner(staged, providers=providers))
        if not report.ok:
            raise ModelError("the model does not match its manifest:\n- " + "\n- ".join(report.problems))
        (folder / version).mkdir(parents=True, exist_ok=False)
        os.replace(staged, folder / version / ARTIFACT_NAME)
        manifest_text = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        _write_text_atomically(folder / "manifest.yaml", manifest_text)
        if not (folder / "MODEL_CARD.md").exists():
            _write_text_atomically(folder / "MODEL_CARD.md", _model_card(manifest))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(name, version, sha256, folder / version / ARTIFACT_NAME, report)


def validate_model(root: Path, name: str, *, version: str | None, providers: list[str]) -> dict[str, ValidationReport]:
    """Re-check a registered model: manifest, artifact hashes, graph against manifest, smoke inference.

    Raises:
        ModelError: the manifest or an artifact is unusable.
    """
    manifest = load_manifest(root / name / "manifest.yaml")
    if manifest.name != name:
        raise ModelError(f"manifest name {manifest.name!r} does not match its folder {name!r}")
    reports: dict[str, ValidationReport] = {}
    for entry in manifest.versions:
        if version is not None and entry.version != version:
            continue
        path = root / name / entry.artifact
        verify_artifact(path, entry.sha256)
        reports[entry.version] = validate(manifest, OnnxRunner(path, providers=providers))
    if not reports:
        raise ModelError(f"model {name} has no version {version}")
    return reports
