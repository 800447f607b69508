"""GPU gauges from NVML: the collector's output for a fake NVML binding, and nothing where NVML is absent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service import metrics


class FakeNvml:
    """The calls of pynvml that the collector makes, for two GPUs, one of which hides its processes."""

    class NVMLError(Exception):
        pass

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fail = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 (NVML's names)
        if self.fail:
            raise self.NVMLError("GPU is lost")
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else "NVIDIA L4"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=37 if handle == 0 else 0, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:  # noqa: N802
        if handle == 1:
            raise self.NVMLError("not supported")
        return [SimpleNamespace(pid=self.pid, usedGpuMemory=512 * 2**20), SimpleNamespace(pid=1, usedGpuMemory=2**30)]


def test_readings_per_gpu_with_this_process_memory() -> None:
    import os

    readings = metrics.gpu_readings(FakeNvml(os.getpid()))
    assert [(r.index, r.name, r.utilization) for r in readings] == [
        (0, "NVIDIA H100 80GB HBM3", 0.37),
        (1, "NVIDIA L4", 0.0),
    ]
    assert readings[0].process_memory_bytes == 512 * 2**20  # only our pid, not the other process's GiB
    assert readings[1].process_memory_bytes is None  # the driver did not say: no made-up zero
    assert readings[1].memory_used_bytes == 2 * 2**30


def test_collector_exposition() -> None:
    import os

    registry = CollectorRegistry()
    nvml = FakeNvml(os.getpid())
    registry.register(metrics.GpuCollector(nvml))
    text = generate_latest(registry).decode()
    assert 'clinfer_gpu_utilization_ratio{gpu="0",name="NVIDIA H100 80GB HBM3"} 0.37' in text
    assert 'clinfer_gpu_memory_total_bytes{gpu="1",name="NVIDIA L4"} 8.589934592e+10' in text
    assert 'clinfer_gpu_process_memory_bytes{gpu="0",name="NVIDIA H100 80GB HBM3"} 5.36870912e+08' in text
    assert 'clinfer_gpu_process_memory_bytes{gpu="1"' not in text
    nvml.fail = True  # a lost GPU: the scrape still answers, without GPU samples
    text = generate_latest(registry).decode()
    assert "clinfer_gpu_utilization_ratio{" not in text


def test_no_nvml_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    assert metrics.load_nvml() is None
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_gpu_collector", None)
    assert metrics.register_gpu_metrics(registry) == 0
    assert "clinfer_gpu" not in generate_latest(registry).decode()
