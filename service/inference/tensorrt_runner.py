"""Native TensorRT: a serialized engine (a "plan") built for the local GPU, run by TensorRT's own runtime.

The only module that imports tensorrt, and it does so inside functions: the service imports (and its CPU tests run)
without it. Device memory and the stream come from cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before
cuda-python 12.6), the only other thing this path needs; there is no torch in serving.

A plan is valid for one GPU model, one TensorRT version, one precision and one batch range, so its file name says all
four (``plan_file_name``) and a plan built elsewhere is never picked up: it is simply not found, and the registry
falls back to ONNX Runtime, saying why. ``clinfer models build-trt NAME`` calls ``build_trt``.

This uses the TensorRT 10 API (named I/O tensors, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import ModelError
from service.inference.manifest import Manifest

if TYPE_CHECKING:
    from service.inference.registry import ModelRegistry

PROVIDER = "TensorRT"
"""What a native runner reports as its provider (in reports and metrics)."""
NATIVE = "TensorRTNative"
"""The name that, first in the configured execution providers, makes the registry prefer a native plan."""
DEFAULT_WORKSPACE_BYTES = 2 * 1024**3

log = logging.getLogger(__name__)


def _tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise ModelError(
            "native TensorRT needs the tensorrt package, which is not installed here "
            "(install the gpu extra on a machine with an NVIDIA GPU: pip install '.[gpu]')"
        ) from e
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise ModelError(f"native TensorRT needs TensorRT 10 or later, found {tensorrt.__version__}")
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError as e:
            raise ModelError(
                "native TensorRT needs cuda-python for device memory and streams (pip install cuda-python)"
            ) from e
    return cudart


def _cuda_call(result: tuple[Any, ...]) -> Any:
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    cudart = _cudart()
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(error)
        raise ModelError(f"CUDA call failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    """As the driver reports it, e.g. ``NVIDIA H100 80GB HBM3``."""
    compute_capability: tuple[int, int]


def local_gpu(device_id: int = 0) -> GpuIdentity:
    """The GPU a plan would be built for and run on.

    Raises:
        ModelError: cuda-python is missing or there is no such device.
    """
    properties = _cuda_call(_cudart().cudaGetDeviceProperties(device_id))
    name = properties.name.decode() if isinstance(properties.name, bytes) else str(properties.name)
    return GpuIdentity(name.rstrip("\x00").strip(), (int(properties.major), int(properties.minor)))


def plan_file_name(gpu: GpuIdentity, trt_version: str, *, fp16: bool, max_batch: int) -> str:
    """The plan's file name: GPU model and architecture, TensorRT version, precision and largest batch.

    TensorRT plans are not portable between GPU models or TensorRT versions, and a plan's batch range is fixed at
    build time; a different value of any of these must name a different file.
    """
    gpu_slug = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-") or "gpu"
    version_slug = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version)
    major, minor = gpu.compute_capability
    precision = "fp16" if fp16 else "fp32"
    return f"plan-{gpu_slug}-sm{major}{minor}-trt{version_slug}-{precision}-b{max_batch}.plan"


def local_plan_name(manifest: Manifest, *, fp16: bool, max_batch: int | None = None, device_id: int = 0) -> str:
    """``plan_file_name`` for this machine's GPU and TensorRT.

    Raises:
        ModelError: tensorrt or cuda-python is missing, or there is no GPU.
    """
    trt = _tensorrt()
    return plan_file_name(
        local_gpu(device_id), trt.__version__, fp16=fp16, max_batch=max_batch or manifest.batching.max_batch_size
    )


def manifest_input_shapes(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """Each graph input the service feeds, and its shape without the batch axis."""
    shapes = {manifest.image_input.name: tuple(manifest.image_input.shape)}
    if manifest.clinical_input is not None:
        n_features = len(manifest.clinical_input.features)
        shapes[manifest.clinical_input.values_name] = (n_features,)
        shapes[manifest.clinical_input.mask_name] = (n_features,)
    return shapes


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    *,
    input_shapes: dict[str, tuple[int, ...]],
    fp16: bool = True,
    max_batch: int = 32,
    opt_batch: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Build a TensorRT engine from an ONNX file for the local GPU and write it to ``plan_path``.

    The engine has one optimization profile: batch 1 to ``max_batch``, tuned for ``opt_batch``.

    Args:
        onnx_path: the ONNX file.
        plan_path: where to write the plan (atomically: a reader never sees half a plan).
        input_shapes: every graph input and its shape without the batch axis (``manifest_input_shapes``).
        fp16: allow FP16 kernels (TensorRT keeps FP32 where FP16 is not faster); check parity with
            ``parity_with_cpu`` before serving.
        max_batch: the largest batch the engine accepts.
        opt_batch: the batch size TensorRT tunes for; default ``max_batch``.
        workspace_bytes: TensorRT's workspace limit while building and running.

    Returns:
        ``plan_path``.

    Raises:
        ModelError: tensorrt is missing, the arguments are invalid, the graph cannot be parsed or has inputs the
            shapes do not describe, or TensorRT cannot build an engine.
    """
    if max_batch < 1:
        raise ModelError(f"'max_batch' must be at least 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ModelError(f"'opt_batch' must be between 1 and max_batch={max_batch}, got {opt}")
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        if name not in input_shapes:
            raise ModelError(f"graph input {name!r} of {onnx_path} has no shape in the manifest")
        rest = tuple(input_shapes[name])
        profile.set_shape(name, (1, *rest), (opt, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    log.info("building a TensorRT plan for %s (fp16=%s, batch 1..%d); this takes minutes", onnx_path, fp16, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT could not build an engine for {onnx_path} (its log above says why)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=plan_path.parent, prefix=".tmp-plan-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(serialized))
        os.replace(tmp, plan_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d bytes)", plan_path, plan_path.stat().st_size)
    return plan_path


class TensorRTRunner:
    """A plan deserialized on the local GPU, behind the same ``Runner`` protocol as ``OnnxRunner``.

    Device buffers are allocated on first use and grown when a larger batch arrives; calls are serialized (one
    execution context).
    """

    def __init__(self, plan_path: Path, manifest: Manifest, *, device_id: int = 0) -> None:
        """Deserialize ``plan_path`` and check its inputs against the manifest.

        Raises:
            ModelError: tensorrt or cuda-python is missing, the plan is missing or was built for another GPU or
                TensorRT version, or its inputs are not the manifest's.
        """
        trt = _tensorrt()
        self._cudart = _cudart()
        if not plan_path.is_file():
            raise ModelError(f"TensorRT plan {plan_path} does not exist")
        self.plan_path = plan_path
        self.provider: str = PROVIDER
        self.fallback_reason: str | None = None
        _cuda_call(self._cudart.cudaSetDevice(device_id))
        self._runtime: Any = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise ModelError(
                f"TensorRT cannot load the plan {plan_path} (built for another GPU or TensorRT version?); "
                f"rebuild it with `clinfer models build-trt {manifest.name}`"
            )
        self._engine: Any = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        expected = set(manifest_input_shapes(manifest))
        if set(self._inputs) != expected:
            raise ModelError(
                f"plan {plan_path} has inputs {sorted(self._inputs)}, the manifest {sorted(expected)}; rebuild it"
            )
        self.max_batch = int(engine.get_tensor_profile_shape(self._inputs[0], 0)[2][0])
        self._context: Any = engine.create_execution_context()
        self._stream: Any = _cuda_call(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, bytes)
        self._lock = threading.Lock()
        log.info("loaded TensorRT plan %s (batch 1..%d)", plan_path.name, self.max_batch)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _cuda_call(self._cudart.cudaFree(pointer))
            pointer, size = int(_cuda_call(self._cudart.cudaMalloc(nbytes))), nbytes
            self._buffers[name] = (pointer, size)
        return pointer

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one batch.

        Raises:
            ModelError: the runner was closed, an input is missing, an output is unknown, the batch is outside the
                plan's range, or TensorRT fails.
        """
        with self._lock:
            if self._context is None:
                raise ModelError(f"the runner of {self.plan_path} was closed; get a new one from the registry")
            missing = [n for n in self._inputs if n not in feeds]
            unknown = [n for n in output_names if n not in self._outputs]
            if missing or unknown:
                raise ModelError(f"plan {self.plan_path.name}: missing inputs {missing}, unknown outputs {unknown}")
            cudart, stream = self._cudart, self._stream
            host_inputs = {}
            for name in self._inputs:
                array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
                if not self._context.set_input_shape(name, array.shape):
                    raise ModelError(
                        f"input {name!r} of shape {array.shape} is outside plan {self.plan_path.name}'s profile "
                        f"(batch 1..{self.max_batch})"
                    )
                host_inputs[name] = array
            results = {}
            for name in self._outputs:
                shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
                nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
                self._context.set_tensor_address(name, self._device_buffer(name, max(nbytes, 1)))
                if name in output_names:
                    results[name] = np.empty(shape, dtype=self._dtypes[name])
            to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            for name, array in host_inputs.items():
                pointer = self._device_buffer(name, max(array.nbytes, 1))
                self._context.set_tensor_address(name, pointer)
                _cuda_call(cudart.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, to_device, stream))
            if not self._context.execute_async_v3(int(stream)):
                raise ModelError(f"TensorRT failed to run plan {self.plan_path.name} (its log above says why)")
            to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            for name, array in results.items():
                pointer = self._buffers[name][0]
                _cuda_call(cudart.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, to_host, stream))
            _cuda_call(cudart.cudaStreamSynchronize(stream))
            return {name: results[name] for name in output_names}

    def close(self) -> None:
        """Free device buffers, the stream, the context and the engine. ``run`` afterwards raises ModelError."""
        with self._lock:
            if self._context is None:
                return
            for pointer, _ in self._buffers.values():
                _cuda_call(self._cudart.cudaFree(pointer))
            self._buffers.clear()
            _cuda_call(self._cudart.cudaStreamDestroy(self._stream))
            # the context before the engine before the runtime: the order TensorRT requires
            self._context = None
            self._engine = None
            self._runtime = None
        gc.collect()
        log.info("unloaded TensorRT plan %s", self.plan_path.name)


def build_trt(
    registry: ModelRegistry,
    name: str,
    version: str | None = None,
    *,
    fp16: bool | None = None,
    max_batch: int | None = None,
    device_id: int = 0,
) -> Path:
    """Build (or rebuild) the plan of a registered model version for this machine's GPU: ``clinfer models build-trt``.

    The plan goes beside the artifact (``<repository>/<name>/<version>/``), or under the registry's cache root when
    the repository is read-only; the registry looks in both places.

    Args:
        registry: a loaded registry.
        name: the model.
        version: default: the latest.
        fp16: default: the registry's ``trt_fp16``.
        max_batch: default: the registry's ``batch_max_size``, else the manifest's ``max_batch_size``.
        device_id: the GPU.

    Returns:
        The plan's path.

    Raises:
        NotFound: no such model or version.
        ModelError: tensorrt or cuda-python is missing, there is no GPU, or the build fails.
    """
    model = registry.get_or_raise(name)
    model, model_version = registry.version_or_raise(name, version or model.manifest.latest().version)
    manifest = model.manifest
    fp16 = registry.trt_fp16 if fp16 is None else fp16
    max_batch = max_batch or registry.max_batch(manifest)
    file_name = local_plan_name(manifest, fp16=fp16, max_batch=max_batch, device_id=device_id)
    folder = registry.writable_version_dir(name, model_version.version)
    return build_plan(
        model.artifact_path(model_version),
        folder / file_name,
        input_shapes=manifest_input_shapes(manifest),
        fp16=fp16,
        max_batch=max_batch,
        opt_batch=min(manifest.batching.preferred_batch_size, max_batch),
    )


def parity_with_cpu(
    registry: ModelRegistry, name: str, version: str, plan_path: Path, *, batch: int = 4, seed: int = 0
) -> float:
    """The largest absolute difference between the plan's logits and ONNX Runtime's on CPU, on the same random
    inputs: what FP16 costs this model. ``clinfer models build-trt`` should print it.

    Raises:
        ModelError: the plan cannot be loaded or run.
    """
    from service.inference.onnx_runner import OnnxRunner

    model, model_version = registry.version_or_raise(name, version)
    manifest = model.manifest
    native = TensorRTRunner(plan_path, manifest)
    cpu = OnnxRunner(model.artifact_path(model_version), providers=["CPUExecutionProvider"])
    try:
        rng = np.random.default_rng(seed)
        size = max(1, min(batch, native.max_batch))
        feeds = {
            input_name: rng.standard_normal((size, *shape)).astype(np.float32)
            for input_name, shape in manifest_input_shapes(manifest).items()
        }
        if manifest.clinical_input is not None:
            mask = manifest.clinical_input.mask_name
            feeds[mask] = (feeds[mask] > 0).astype(np.float32)
        logits = manifest.outputs.logits
        difference = np.abs(native.run(feeds, [logits])[logits] - cpu.run(feeds, [logits])[logits])
    finally:
        native.close()
        cpu.close()
    return float(difference.max())
