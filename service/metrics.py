"""Every Prometheus collector, declared once. Labels are bounded: never a patient, study or job id."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("clinfer_http_requests_total", "HTTP requests answered", ["route", "method", "status"])
HTTP_DURATION = Histogram(
    "clinfer_http_request_duration_seconds",
    "HTTP request duration",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INGEST_INSTANCES = Counter("clinfer_ingest_instances_total", "DICOM instances received", ["protocol", "outcome"])
INGEST_BYTES = Counter("clinfer_ingest_bytes_total", "DICOM bytes stored", ["protocol"])
FHIR_RESOURCES = Counter("clinfer_fhir_resources_total", "FHIR resources received", ["resource_type", "outcome"])
JOBS = Counter("clinfer_jobs_total", "Job state transitions", ["model", "state"])
JOBS_IN_STATE = Gauge("clinfer_jobs_in_state", "Jobs currently in each state (sampled)", ["state"])
JOB_FAILURES = Counter("clinfer_job_failures_total", "Jobs failed, by stage and error code", ["model", "stage", "code"])
INFERENCE_DURATION = Histogram(
    "clinfer_inference_duration_seconds",
    "Time in the inference runtime per batch",
    ["model", "version", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PREPROCESS_DURATION = Histogram(
    "clinfer_preprocess_duration_seconds",
    "Decode + windowing + clinical vector per study",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REPORTS = Counter("clinfer_reports_total", "Reports produced", ["model", "version"])
AUDIT_EVENTS = Counter("clinfer_audit_events_total", "Audit events appended", ["event_type", "outcome"])
AUDIT_FAILURES = Counter(
    "clinfer_audit_failures_total",
    "Audit events that could not be appended (the access they record refused)",
    ["event_type"],
)
AUTH_DENIALS = Counter("clinfer_auth_denials_total", "Requests refused by authentication or authorization", ["reason"])
DIMSE_REFUSED = Counter(
    "clinfer_dimse_refused_total",
    "DICOM connections the listener closed at a limit (too many connections, a PDU or an object too large)",
    ["reason"],
)
QUEUE_WAIT = Histogram(
    "clinfer_queue_wait_seconds",
    "Time a job waited in a queue before its stage started",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_DEPTH = Gauge(
    "clinfer_queue_depth",
    "Messages waiting in each queue (sampled; Redis only; no sample while the broker cannot be read)",
    ["queue"],
)
MODEL_LOADED = Gauge(
    "clinfer_model_loaded",
    "1 for each model version this process has loaded, with the execution provider it really runs on (a fallback "
    "from TensorRT or CUDA shows here); gone when it is unloaded",
    ["model", "version", "provider"],
)
NO_ROUTE = Counter("clinfer_studies_no_route_total", "Studies that no routing rule sends to a model")
REPORT_AMENDMENTS = Counter("clinfer_report_amendments_total", "Reports amended by a later analysis", ["model"])
DICOM_RESULTS = Counter(
    "clinfer_dicom_results_total", "DICOM results made (SR, heatmap Secondary Capture)", ["model", "kind"]
)
DELIVERIES = Counter(
    "clinfer_deliveries_total", "Result pushes to destinations, by outcome", ["destination", "outcome"]
)
RECONCILED_JOBS = Counter("clinfer_reconciled_jobs_total", "Lost jobs re-enqueued by the reconciler")
BATCH_SIZE = Histogram(
    "clinfer_batch_size",
    "Requests per model call made by the dynamic batcher (calls that returned; a failed batch is run again one "
    "by one)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
JOB_STAGE_SECONDS = Histogram(
    "clinfer_job_stage_seconds",
    "Seconds each analysis spent in each stage, from its recorded timings when its report is stored",
    ["model", "stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_WAIT = Histogram(
    "clinfer_batch_wait_seconds",
    "Time a request waits in the dynamic batcher, from submission to the start of its model call",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# --- GPU utilization and memory, read from NVML at each scrape ---------------------------------------------------


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization: float  # fraction of the last sample period in which a kernel ran (0..1)
    memory_used_bytes: int
    memory_total_bytes: int
    process_memory_bytes: int | None  # what this process holds on the GPU; None where the driver does not say


def gpu_readings(nvml: Any) -> list[GpuReading]:
    """One reading per GPU from an initialized NVML binding (``pynvml`` of nvidia-ml-py)."""
    readings = []
    pid = os.getpid()
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            own: int | None = sum(int(p.usedGpuMemory or 0) for p in processes if p.pid == pid)
        except nvml.NVMLError:
            own = None
        readings.append(
            GpuReading(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                utilization=float(utilization.gpu) / 100.0,
                memory_used_bytes=int(memory.used),
                memory_total_bytes=int(memory.total),
                process_memory_bytes=own,
            )
        )
    return readings


class GpuCollector(Collector):
    """``clinfer_gpu_*`` gauges, read from NVML when Prometheus scrapes (nothing is sampled in between)."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def collect(self) -> Iterator[Metric]:
        labels = ["gpu", "name"]
        utilization = GaugeMetricFamily(
            "clinfer_gpu_utilization_ratio", "Fraction of time a kernel ran on the GPU (NVML sample)", labels=labels
        )
        used = GaugeMetricFamily("clinfer_gpu_memory_used_bytes", "GPU memory in use, all processes", labels=labels)
        total = GaugeMetricFamily("clinfer_gpu_memory_total_bytes", "GPU memory", labels=labels)
        own = GaugeMetricFamily("clinfer_gpu_process_memory_bytes", "GPU memory this process holds", labels=labels)
        try:
            readings = gpu_readings(self.nvml)
        except self.nvml.NVMLError as e:  # a GPU fell off the bus, a driver reload: the scrape still answers
            log.warning("NVML read failed: %s", e)
            readings = []
        for reading in readings:
            values = [str(reading.index), reading.name]
            utilization.add_metric(values, reading.utilization)
            used.add_metric(values, reading.memory_used_bytes)
            total.add_metric(values, reading.memory_total_bytes)
            if reading.process_memory_bytes is not None:
                own.add_metric(values, reading.process_memory_bytes)
        yield from (utilization, used, total, own)


def load_nvml() -> Any | None:
    """The initialized NVML binding, or None where there is no nvidia-ml-py, driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
    except pynvml.NVMLError as e:
        log.info("no GPU metrics: NVML is not usable here (%s)", e)
        return None
    return pynvml


_gpu_collector: GpuCollector | None = None


def register_gpu_metrics(registry: CollectorRegistry = REGISTRY) -> int:
    """Expose the GPUs' utilization and memory where NVML works (GPU workers); the number of GPUs seen.

    Called once per process by the processes that run models; a process without a GPU exports nothing of these.
    """
    global _gpu_collector
    if _gpu_collector is None:
        nvml = load_nvml()
        if nvml is None:
            return 0
        _gpu_collector = GpuCollector(nvml)
        registry.register(_gpu_collector)
    return int(_gpu_collector.nvml.nvmlDeviceGetCount())
