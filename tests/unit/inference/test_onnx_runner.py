"""OnnxRunner on the shipped cxr-fusion model, with this machine's onnxruntime (the CPU build in CI).

The GPU providers cannot run here; what can be checked is the choice and its honesty (provider, fallback_reason),
the CPU tuning, the I/O-binding path (ONNX Runtime binds on CPU sessions too) and the options handed to the GPU
providers. docs/gpu.md says how the GPU paths are checked on a GPU machine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.config import Settings
from service.errors import ModelError
from service.inference import onnx_runner
from service.inference.onnx_runner import OnnxRunner, cpu_threads_available, writable_dir
from service.inference.registry import ModelRegistry
from tests.conftest import REPO

GPU_ORDER = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
SHIPPED = REPO / "models" / "cxr-fusion" / "1" / "model.onnx"


def _feeds(batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((batch, 1, 256, 256)).astype(np.float32),
        "clinical": rng.standard_normal((batch, 10)).astype(np.float32),
        "clinical_mask": (rng.random((batch, 10)) > 0.5).astype(np.float32),
    }


def _copy_model(tmp_path: Path) -> Path:
    target = tmp_path / "models" / "cxr-fusion" / "1" / "model.onnx"
    target.parent.mkdir(parents=True)
    shutil.copyfile(SHIPPED, target)
    return target


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this onnxruntime is a GPU build; the CPU fallback is checked on CPU builds (see docs/gpu.md)",
)
def test_the_cpu_build_runs_on_cpu_and_says_why_not_on_gpu() -> None:
    runner = OnnxRunner(SHIPPED, providers=GPU_ORDER)
    assert runner.provider == "CPUExecutionProvider"
    assert runner.fallback_reason is not None
    assert "TensorrtExecutionProvider: not in this onnxruntime build" in runner.fallback_reason
    assert "CUDAExecutionProvider: not in this onnxruntime build" in runner.fallback_reason
    assert not runner.use_io_binding, "plain run on CPU"
    assert runner.run(_feeds(), ["logits"])["logits"].shape == (3, 5)


def test_cpu_first_has_no_fallback_reason() -> None:
    runner = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"])
    assert (runner.provider, runner.fallback_reason) == ("CPUExecutionProvider", None)


def test_the_session_runs_with_the_threads_we_set() -> None:
    runner = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"], cpu_threads=3)
    assert runner.options.intra_op_num_threads == 3
    assert runner.options.inter_op_num_threads == 1
    assert runner.options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_the_cpu_threads_sleep_between_calls_unless_told_to_spin(tmp_path: Path) -> None:
    # spinning threads take the cores the decode, the API and the reports share with the model
    quiet = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"])
    assert quiet.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"], cpu_spin=True)
    assert spinning.options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    # from the settings, through the registry
    settings = Settings(state_dir=tmp_path, cpu_spin=True, execution_providers=["CPUExecutionProvider"])
    assert ModelRegistry(**settings.model_registry_options()).cpu_spin is True


def test_by_default_the_threads_are_the_cpus_this_process_may_use() -> None:
    available = cpu_threads_available()
    assert 1 <= available <= len(os.sched_getaffinity(0))
    assert OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"]).options.intra_op_num_threads == available
    with pytest.raises(ModelError, match="'cpu_threads' must be at least 1"):
        OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"], cpu_threads=0)


def test_io_binding_gives_the_outputs_of_a_plain_run() -> None:
    plain = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"], use_io_binding=False)
    bound = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"], use_io_binding=True)
    feeds = _feeds()
    # a non-contiguous view: the binding reads buffers in place, so the runner must make it contiguous
    feeds["image"] = np.ascontiguousarray(feeds["image"].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not feeds["image"].flags.c_contiguous
    expected = plain.run(feeds, ["logits", "heatmap"])
    actual = bound.run(feeds, ["heatmap", "logits"])
    assert set(actual) == {"logits", "heatmap"}
    for name in expected:
        assert actual[name].shape == expected[name].shape
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-6)
    # the batch axis is dynamic: another batch size through the same bound runner
    assert bound.run(_feeds(batch=1, seed=1), ["logits"])["logits"].shape == (1, 5)


def test_a_closed_runner_refuses_to_run() -> None:
    runner = OnnxRunner(SHIPPED, providers=["CPUExecutionProvider"])
    runner.close()
    with pytest.raises(ModelError, match="was closed"):
        runner.run(_feeds(), ["logits"])
    with pytest.raises(ModelError, match="was closed"):
        runner.input_specs()


def test_an_unloadable_model_is_a_model_error(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxRunner(broken, providers=GPU_ORDER)


class _GpuBuildWithoutTensorRT:
    """Stands in for onnxruntime-gpu on a host without TensorRT's libraries: the build lists TensorRT and CUDA,
    creating a session with TensorRT raises (as libnvinfer failing to load does), and the real onnxruntime (a CPU
    build here) then leaves CUDA unregistered. Records the provider options it was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[Any]] = []
        real = ort.InferenceSession

        def session(path: str, *, sess_options: Any, providers: list[Any], enable_fallback: int) -> Any:
            self.calls.append(providers)
            first = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
            if first == "TensorrtExecutionProvider":
                raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
            return real(path, sess_options=sess_options, providers=providers, enable_fallback=enable_fallback)

        monkeypatch.setattr(onnx_runner.ort, "get_available_providers", lambda: GPU_ORDER)
        monkeypatch.setattr(onnx_runner.ort, "InferenceSession", session)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_provider_that_fails_to_load_is_skipped_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime-gpu on a GPU host really registers CUDA for the second session; a CPU build leaves it out
    cuda_works = "CUDAExecutionProvider" in ort.get_available_providers()
    fake = _GpuBuildWithoutTensorRT(monkeypatch)
    profile = {
        "image": ((1, 1, 256, 256), (8, 1, 256, 256), (32, 1, 256, 256)),
        "clinical": ((1, 10), (8, 10), (32, 10)),
    }
    runner = OnnxRunner(_copy_model(tmp_path), providers=GPU_ORDER, trt_fp16=False, trt_profile=profile)

    assert runner.provider == ("CUDAExecutionProvider" if cuda_works else "CPUExecutionProvider")
    assert runner.fallback_reason is not None
    assert "TensorrtExecutionProvider: failed to create a session (libnvinfer.so.10" in runner.fallback_reason
    assert ("CUDAExecutionProvider" in runner.fallback_reason) is not cuda_works
    assert [len(call) for call in fake.calls] == [3, 2], "TensorRT+CUDA+CPU, then CUDA+CPU"

    trt_name, trt_options = fake.calls[0][0]
    assert trt_name == "TensorrtExecutionProvider"
    assert trt_options["trt_fp16_enable"] is False
    assert trt_options["trt_engine_cache_enable"] is True and trt_options["trt_timing_cache_enable"] is True
    cache = Path(trt_options["trt_engine_cache_path"])
    assert cache.parent == tmp_path / "models" / "cxr-fusion" / "1" / "trt-cache" and cache.is_dir()
    assert cache.name.startswith(f"ort{ort.__version__}-trt")
    assert trt_options["trt_profile_min_shapes"] == "image:1x1x256x256,clinical:1x10"
    assert trt_options["trt_profile_opt_shapes"] == "image:8x1x256x256,clinical:8x10"
    assert trt_options["trt_profile_max_shapes"] == "image:32x1x256x256,clinical:32x10"
    cuda_name, cuda_options = fake.calls[1][0]
    assert cuda_name == "CUDAExecutionProvider"
    assert cuda_options["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda_options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda_options["use_tf32"] == 0  # FP32 parity with the CPU, as validated


def test_the_engine_cache_falls_back_when_the_repository_is_read_only(tmp_path: Path) -> None:
    blocked = tmp_path / "repository-file"
    blocked.write_text("a file where a folder would go, as good as read-only for mkdir")
    fallback = tmp_path / "cache" / "trt"
    assert writable_dir(blocked / "trt-cache", fallback=fallback) == fallback
    assert fallback.is_dir()
    assert writable_dir(tmp_path / "ok", fallback=fallback) == tmp_path / "ok"
    with pytest.raises(ModelError, match="writable"):
        writable_dir(blocked / "a", fallback=blocked / "b")


def test_unloading_a_model_closes_its_runner_and_the_next_call_loads_it_again(tmp_path: Path) -> None:
    from service.inference.registry import ModelRegistry

    root = tmp_path / "models"
    shutil.copytree(REPO / "models" / "cxr-fusion", root / "cxr-fusion")
    registry = ModelRegistry(root=root, providers=["CPUExecutionProvider"], cpu_threads=1)
    registry.load()
    first = registry.runner("cxr-fusion", "1")
    assert registry.runner("cxr-fusion", "1") is first
    assert registry.unload("cxr-fusion", "1") is True
    with pytest.raises(ModelError, match="was closed"):
        first.run(_feeds(), ["logits"])
    assert registry.unload("cxr-fusion", "1") is False, "nothing loaded any more"
    second = registry.runner("cxr-fusion", "1")
    assert second is not first
    assert second.run(_feeds(batch=2), ["logits"])["logits"].shape == (2, 5)
