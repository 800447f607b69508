"""ONNX Runtime runner: the only module that imports onnxruntime.

One ``OnnxRunner`` is one model on one execution provider. The configured providers are tried in order and the
runner says which one the session really runs on (``provider``) and why a preferred one was not used
(``fallback_reason``): reports and metrics carry ``provider``, so a GPU worker that silently ran on CPU is visible.

Per provider:

* CPU: ``intra_op_num_threads`` = the CPUs this process may use (affinity and cgroup quota, not the host's count:
  in a container ``os.cpu_count()`` is the host's, and oversubscribed threads thrash), one inter-op thread and
  sequential execution (our graphs are chains of convolutions; a second pool only competes for the same cores).
  The intra-op threads sleep between calls rather than spin (``cpu_spin`` turns spinning back on for a machine
  that runs nothing but the model).
  Memory pattern and arena stay at ONNX Runtime's defaults: they reuse one plan per input shape, and the dynamic
  batcher produces few shapes.
* CUDA: ``arena_extend_strategy=kSameAsRequested`` (the arena grows by what is asked, not by powers of two, so
  several models fit on one GPU), ``cudnn_conv_algo_search=EXHAUSTIVE`` (cuDNN benchmarks each convolution once per
  input shape and caches the winner; a worker lives long and the batcher's shapes are bounded by the manifest's
  ``max_batch_size``, so the one-off search buys the fastest kernels; HEURISTIC would trade them for a cheaper
  first call), ``do_copy_in_default_stream=True`` (copies ordered with compute: correct without extra syncs),
  ``use_tf32=0`` (FP32 results, as the models were validated; TF32 moved logits by up to 0.016 on an H100).
  ``run`` uses I/O binding: inputs bound from numpy, outputs allocated by ONNX Runtime on the host, so no
  intermediate output copies are made by the Python layer.
* TensorRT: FP16 (``trt_fp16`` argument), engine and timing caches on disk (so a restart does not rebuild engines
  for minutes), an explicit optimization profile for the batch range when the caller gives one (otherwise the EP
  rebuilds its engine each time a larger batch arrives), and a bounded workspace.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.errors import ModelError

log = logging.getLogger(__name__)

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
_GPU_PROVIDERS = frozenset({TENSORRT_EP, CUDA_EP})
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu12-libs", "tensorrt-cu13", "tensorrt-cu13-libs")

# name -> (min, opt, max) shape, each with the batch axis
ShapeProfile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def cpu_threads_available() -> int:
    """CPUs this process may use: its affinity mask, further limited by a cgroup CPU quota when one is set."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(count, quota)) if quota is not None else max(1, count)


def _cgroup_cpu_quota() -> int | None:
    """ceil(quota / period) from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_*``; None when unlimited or unreadable."""
    try:
        quota_text, period_text = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota_text == "max":
            return None
        return math.ceil(int(quota_text) / int(period_text))
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/clinfer``, else ``~/.cache/clinfer``: caches go there when the repository is read-only."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "clinfer"


def writable_dir(preferred: Path, *, fallback: Path) -> Path:
    """``preferred`` if it can be created and written to, else ``fallback`` (created), with a log line saying so.

    Raises:
        ModelError: neither folder is writable.
    """
    for candidate in (preferred, fallback):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            if candidate is fallback:
                log.info("%s is not writable (read-only model repository?); caching in %s instead", preferred, fallback)
            return candidate
    raise ModelError(f"neither {preferred} nor {fallback} is writable for the engine cache")


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, read from package metadata (without loading TensorRT)."""
    for distribution in _TENSORRT_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _profile_option(profile: ShapeProfile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


class OnnxRunner:
    """One ONNX model on the first execution provider of the configured order that really works here."""

    def __init__(
        self,
        path: Path,
        *,
        providers: Sequence[str],
        cpu_threads: int | None = None,
        cpu_spin: bool = False,
        device_id: int = 0,
        trt_fp16: bool = True,
        trt_cache_dir: Path | None = None,
        cache_root: Path | None = None,
        trt_workspace_bytes: int = 2 * 1024**3,
        trt_profile: ShapeProfile | None = None,
        use_io_binding: bool | None = None,
    ) -> None:
        """Load ``path`` on the best provider available.

        Args:
            path: the ONNX file.
            providers: ONNX Runtime provider names in order of preference. Providers this onnxruntime build lacks
                are skipped; one whose session cannot be created (missing CUDA/TensorRT libraries) is skipped with
                a warning; CPU is the last resort even when not listed.
            cpu_threads: intra-op threads; default: the CPUs this process may use (``cpu_threads_available``).
            cpu_spin: let the intra-op threads spin between calls instead of sleeping.
            device_id: the GPU, for the CUDA and TensorRT providers.
            trt_fp16: let TensorRT pick FP16 kernels (validate parity against CPU: see docs/gpu.md).
            trt_cache_dir: engine and timing cache folder of the TensorRT provider; default ``trt-cache`` beside the
                model, or ``<cache_root>/<model>/<version>/trt-cache`` when that is read-only. A subfolder per ONNX
                Runtime and TensorRT version keeps engines of another version from being loaded.
            cache_root: where caches go when the model repository is read-only; default ``default_cache_root()``.
            trt_workspace_bytes: TensorRT's workspace limit.
            trt_profile: min/opt/max shapes per input for the TensorRT engine (batch range); None: let the EP
                infer them from the shapes it sees.
            use_io_binding: run through I/O binding; default: on for the CUDA and TensorRT providers.

        Raises:
            ModelError: no provider, CPU included, can load the model.
        """
        self.path = path
        self.cache_root = cache_root or default_cache_root()
        self.cpu_threads = cpu_threads if cpu_threads is not None else cpu_threads_available()
        if self.cpu_threads < 1:
            raise ModelError(f"'cpu_threads' must be at least 1, got {self.cpu_threads}")
        self.cpu_spin = cpu_spin
        available = set(ort.get_available_providers())
        requested = list(providers) or [CPU_EP]
        candidates = [p for p in requested if p in available]
        if CPU_EP not in candidates:
            candidates.append(CPU_EP)
        build = ort.get_device()
        why_not = {p: f"not in this onnxruntime build ({build})" for p in requested if p not in available}
        options = self._session_options()
        session: ort.InferenceSession | None = None
        for start in range(len(candidates)):
            attempt = candidates[start:]
            try:
                configured = [
                    self._provider_entry(p, device_id, trt_fp16, trt_cache_dir, trt_workspace_bytes, trt_profile)
                    for p in attempt
                ]
                # enable_fallback=0: onnxruntime would otherwise retry on other providers behind our back (and again
                # at run time, after an EP failure), which would make ``provider`` a lie.
                session = ort.InferenceSession(str(path), sess_options=options, providers=configured, enable_fallback=0)
                break
            except Exception as e:  # onnxruntime raises untyped RuntimeError/Fail for provider and graph errors
                if attempt[0] == CPU_EP:
                    raise ModelError(f"ONNX Runtime cannot load {path}: {e}") from e
                why_not[attempt[0]] = f"failed to create a session ({e})"
                log.warning("%s: %s failed (%s); trying %s", path.name, attempt[0], e, ", ".join(attempt[1:]))
        assert session is not None  # the loop either breaks with a session or raises on CPU
        session.disable_fallback()  # for onnxruntime versions that ignore enable_fallback=0
        self._session: ort.InferenceSession | None = session
        self.provider: str = session.get_providers()[0]
        self.options: ort.SessionOptions = session.get_session_options()  # what the session really runs with
        for name in candidates:
            if name not in session.get_providers() and name not in why_not:
                why_not[name] = "in this build, but not registered (its CUDA/TensorRT libraries did not load)"
        preferred = requested[: requested.index(self.provider)] if self.provider in requested else requested
        self.fallback_reason: str | None = (
            "; ".join(f"{name}: {why_not[name]}" for name in preferred if name in why_not) or None
        )
        self.use_io_binding = self.provider in _GPU_PROVIDERS if use_io_binding is None else use_io_binding
        self.device_id = device_id
        self._lock = threading.Lock()
        if self.fallback_reason:
            log.warning("loaded %s on %s, not %s: %s", path.name, self.provider, preferred[0], self.fallback_reason)
        else:
            log.info("loaded %s on %s", path.name, self.provider)

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.cpu_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ONNX Runtime's default keeps the intra-op threads spinning after each call, waiting for the next: on a
        # machine where the same cores decode, serve HTTP and build reports, that is CPU taken from them (the infer
        # worker spent 61-78 ms of CPU per study with it and 35 ms without, in `clinfer bench` on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.cpu_spin else "0")
        return options

    def _provider_entry(
        self,
        provider: str,
        device_id: int,
        trt_fp16: bool,
        trt_cache_dir: Path | None,
        trt_workspace_bytes: int,
        trt_profile: ShapeProfile | None,
    ) -> str | tuple[str, dict[str, Any]]:
        if provider == CUDA_EP:
            return provider, {
                "device_id": device_id,
                "arena_extend_strategy": "kSameAsRequested",
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "do_copy_in_default_stream": True,
                # full FP32 in convolutions and matrix products: with TF32 (ONNX Runtime's default on Ampere and
                # later) the H100 gave logits up to 0.016 away from the CPU's, enough to flip a finding near its
                # threshold; these models are validated in FP32, and reduced precision is TensorRT's FP16, opted in
                "use_tf32": 0,
            }
        if provider == TENSORRT_EP:
            cache = self.trt_cache_dir(trt_cache_dir)
            options: dict[str, Any] = {
                "device_id": device_id,
                "trt_fp16_enable": trt_fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                "trt_max_workspace_size": trt_workspace_bytes,
            }
            if trt_profile:
                options["trt_profile_min_shapes"] = _profile_option(trt_profile, 0)
                options["trt_profile_opt_shapes"] = _profile_option(trt_profile, 1)
                options["trt_profile_max_shapes"] = _profile_option(trt_profile, 2)
            return provider, options
        return provider

    def trt_cache_dir(self, configured: Path | None) -> Path:
        """The TensorRT EP's cache folder: versioned, because its engine files are named by graph and GPU
        architecture only, and an engine of another TensorRT or onnxruntime version must not be loaded."""
        versioned = f"ort{ort.__version__}-trt{tensorrt_version() or 'unknown'}"
        preferred = (configured or self.path.parent / "trt-cache") / versioned
        # <root>/<name>/<version>/model.onnx: the same layout under the cache root
        fallback = self.cache_root / self.path.parent.parent.name / self.path.parent.name / "trt-cache" / versioned
        return writable_dir(preferred, fallback=fallback)

    def _live_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise ModelError(f"the runner of {self.path} was closed; get a new one from the registry")
        return self._session

    def input_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        return {i.name: (list(i.shape), i.type) for i in self._live_session().get_inputs()}

    def output_specs(self) -> dict[str, tuple[list[int | str | None], str]]:
        return {o.name: (list(o.shape), o.type) for o in self._live_session().get_outputs()}

    def output_names(self) -> list[str]:
        return [o.name for o in self._live_session().get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one batch.

        Raises:
            ModelError: the runner was closed.
        """
        # InferenceSession.run is thread-safe, but serializing keeps one model's memory bounded per process.
        with self._lock:
            session = self._live_session()
            if self.use_io_binding:
                outputs = self._run_bound(session, feeds, output_names)
            else:
                outputs = session.run(output_names, feeds)
        return dict(zip(output_names, outputs, strict=True))

    def _run_bound(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], output_names: list[str]
    ) -> list[np.ndarray]:
        binding = session.io_binding()
        for name, array in feeds.items():
            # the binding reads the array's buffer in place: it must be contiguous
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in output_names:
            # outputs on the host, allocated by ONNX Runtime at the shape it computes (the batch axis is dynamic)
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs

    def close(self) -> None:
        """Release the session (and the device memory it holds). ``run`` afterwards raises ModelError."""
        with self._lock:
            self._session = None
        gc.collect()
        log.info("unloaded %s (%s)", self.path.name, self.provider)
