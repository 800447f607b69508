from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from service import metrics
from service.errors import NotFound
from service.inference.registry import ModelRegistry
from tests.conftest import REPO


def _copy_repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(REPO / "models" / "cxr-fusion", root / "cxr-fusion")
    return root


def test_shipped_model_loads_and_matches_its_manifest(tmp_path: Path) -> None:
    registry = ModelRegistry(root=_copy_repository(tmp_path), providers=["CPUExecutionProvider"])
    registry.load()
    assert registry.errors == {}
    manifest = registry.get_or_raise("cxr-fusion").manifest
    runner = registry.runner("cxr-fusion", manifest.latest().version)
    inputs = runner.input_specs()
    assert manifest.image_input.name in inputs
    assert manifest.clinical_input is not None
    assert inputs[manifest.clinical_input.values_name][0][1] == len(manifest.clinical_input.features)
    assert manifest.outputs.logits in runner.output_names()
    assert [f.code for f in manifest.outputs.findings] == ["233604007", "8186001", "60046008", "19242006", "36118008"]


def test_an_artifact_whose_hash_does_not_match_is_refused(tmp_path: Path) -> None:
    root = _copy_repository(tmp_path)
    with (root / "cxr-fusion" / "1" / "model.onnx").open("ab") as artifact:
        artifact.write(b"\0")
    registry = ModelRegistry(root=root, providers=["CPUExecutionProvider"])
    registry.load()
    assert "cxr-fusion" not in registry.models
    assert "refusing to serve it" in registry.errors["cxr-fusion"]
    with pytest.raises(NotFound, match="refusing"):
        registry.get_or_raise("cxr-fusion")


def test_a_manifest_that_does_not_validate_is_reported(tmp_path: Path) -> None:
    root = _copy_repository(tmp_path)
    (root / "cxr-fusion" / "manifest.yaml").write_text("name: cxr-fusion\nversions: []\n")
    registry = ModelRegistry(root=root, providers=["CPUExecutionProvider"])
    registry.load()
    assert registry.models == {} and "invalid" in registry.errors["cxr-fusion"]


def test_a_loaded_version_is_a_metric_with_its_provider_until_it_is_unloaded(tmp_path: Path) -> None:
    """Operators see which process runs which model version on which execution provider (a fallback from TensorRT
    or CUDA to the CPU shows), from each worker's /metrics."""
    from prometheus_client import REGISTRY

    def loaded() -> float | None:
        labels = {"model": "cxr-fusion", "version": "1", "provider": "CPUExecutionProvider"}
        return REGISTRY.get_sample_value("clinfer_model_loaded", labels)

    with contextlib.suppress(KeyError):  # another test's registry in this process may have loaded it
        metrics.MODEL_LOADED.remove("cxr-fusion", "1", "CPUExecutionProvider")
    registry = ModelRegistry(root=_copy_repository(tmp_path), providers=["CPUExecutionProvider"])
    registry.load()
    assert loaded() is None
    registry.runner("cxr-fusion", "1")
    assert loaded() == 1.0
    assert registry.unload("cxr-fusion", "1") is True
    assert loaded() is None
