"""The native TensorRT runner where TensorRT is absent (this machine): it imports, refuses clearly, names plans so
that one built for another GPU, TensorRT version, precision or batch range is never used, and the registry falls
back to ONNX Runtime saying why. Building and running plans needs a GPU: docs/gpu.md says how that is checked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from service.errors import ModelError, NotFound
from service.inference import tensorrt_runner
from service.inference.manifest import load_manifest
from service.inference.registry import ModelRegistry
from service.inference.tensorrt_runner import (
    GpuIdentity,
    TensorRTRunner,
    build_plan,
    build_trt,
    manifest_input_shapes,
    plan_file_name,
)
from tests.conftest import REPO

MANIFEST = load_manifest(REPO / "models" / "cxr-fusion" / "manifest.yaml")
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.fixture
def without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tensorrt`` fails, whatever is installed (None in sys.modules makes the import raise ImportError)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def tensorrt_without_cuda_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TensorRT 10 module object (never called: the cuda-python check comes first), and no cuda-python."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0.43"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)


def _registry(tmp_path: Path, providers: list[str]) -> ModelRegistry:
    root = tmp_path / "models"
    shutil.copytree(REPO / "models" / "cxr-fusion", root / "cxr-fusion")
    registry = ModelRegistry(root=root, providers=providers, cache_root=tmp_path / "cache")
    registry.load()
    assert registry.errors == {}
    return registry


def test_the_module_and_the_registry_import_without_tensorrt() -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None; "
        "import service.inference.tensorrt_runner, service.inference.registry; print('imported')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_building_a_plan_without_tensorrt_says_what_is_missing(tmp_path: Path, without_tensorrt: None) -> None:
    with pytest.raises(ModelError, match=r"needs the tensorrt package.*pip install '\.\[gpu\]'"):
        build_plan(
            REPO / "models" / "cxr-fusion" / "1" / "model.onnx",
            tmp_path / "x.plan",
            input_shapes=manifest_input_shapes(MANIFEST),
        )
    assert not (tmp_path / "x.plan").exists()


def test_build_plan_checks_its_batch_range_first(tmp_path: Path, without_tensorrt: None) -> None:
    shapes = manifest_input_shapes(MANIFEST)
    with pytest.raises(ModelError, match="'max_batch' must be at least 1"):
        build_plan(tmp_path / "m.onnx", tmp_path / "x.plan", input_shapes=shapes, max_batch=0)
    with pytest.raises(ModelError, match="'opt_batch' must be between 1 and max_batch=8"):
        build_plan(tmp_path / "m.onnx", tmp_path / "x.plan", input_shapes=shapes, max_batch=8, opt_batch=9)


def test_loading_a_plan_without_tensorrt_says_what_is_missing(tmp_path: Path, without_tensorrt: None) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(ModelError, match="needs the tensorrt package"):
        TensorRTRunner(plan, MANIFEST)


def test_loading_a_plan_without_cuda_python_says_what_is_missing(
    tmp_path: Path, tensorrt_without_cuda_python: None
) -> None:
    with pytest.raises(ModelError, match=r"needs cuda-python .*pip install cuda-python"):
        TensorRTRunner(tmp_path / "model.plan", MANIFEST)


def test_tensorrt_before_10_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(ModelError, match="needs TensorRT 10 or later, found 8.6.1"):
        TensorRTRunner(tmp_path / "model.plan", MANIFEST)


def test_a_plan_is_named_by_gpu_tensorrt_version_precision_and_batch_range() -> None:
    name = plan_file_name(H100, "10.8.0.43", fp16=True, max_batch=32)
    assert name == "plan-nvidia-h100-80gb-hbm3-sm90-trt10.8.0.43-fp16-b32.plan"
    others = {
        plan_file_name(GpuIdentity("NVIDIA A100-SXM4-80GB", (8, 0)), "10.8.0.43", fp16=True, max_batch=32),
        plan_file_name(GpuIdentity("NVIDIA H100 PCIe", (9, 0)), "10.8.0.43", fp16=True, max_batch=32),
        plan_file_name(H100, "10.9.0.34", fp16=True, max_batch=32),
        plan_file_name(H100, "10.8.0.43", fp16=False, max_batch=32),
        plan_file_name(H100, "10.8.0.43", fp16=True, max_batch=64),
    }
    assert name not in others and len(others) == 5
    assert plan_file_name(GpuIdentity("GeForce RTX 4090 / OEM", (8, 9)), "10.0.1", fp16=False, max_batch=1) == (
        "plan-geforce-rtx-4090-oem-sm89-trt10.0.1-fp32-b1.plan"
    )


def test_the_inputs_a_plan_is_built_for_are_the_manifests() -> None:
    assert manifest_input_shapes(MANIFEST) == {"image": (1, 256, 256), "clinical": (10,), "clinical_mask": (10,)}


def test_native_first_falls_back_to_onnx_runtime_and_says_why(tmp_path: Path, without_tensorrt: None) -> None:
    registry = _registry(tmp_path, [tensorrt_runner.NATIVE, "CPUExecutionProvider"])
    runner = registry.runner("cxr-fusion", "1")
    assert runner.provider == "CPUExecutionProvider"
    reason = getattr(runner, "fallback_reason", None)
    assert reason is not None and reason.startswith("TensorRTNative: native TensorRT needs the tensorrt package")


def test_build_trt_without_tensorrt_is_a_model_error_and_an_unknown_model_is_not_found(
    tmp_path: Path, without_tensorrt: None
) -> None:
    registry = _registry(tmp_path, ["CPUExecutionProvider"])
    with pytest.raises(ModelError, match="needs the tensorrt package"):
        build_trt(registry, "cxr-fusion")
    with pytest.raises(NotFound):
        build_trt(registry, "no-such-model")
    with pytest.raises(NotFound):
        build_trt(registry, "cxr-fusion", "7")
    assert not list((tmp_path / "models").rglob("*.plan"))
