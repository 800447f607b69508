"""Every Prometheus collector, declared once. Labels are bounded: never a patient, study or job id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
AUTH_DENIALS = Counter("clinfer_auth_denials_total", "Requests refused by authentication or authorization", ["reason"])
QUEUE_WAIT = Histogram(
    "clinfer_queue_wait_seconds",
    "Time a job waited in a queue before its stage started",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUE_DEPTH = Gauge("clinfer_queue_depth", "Messages waiting in each queue (sampled; Redis only)", ["queue"])
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
    "Requests per model call made by the dynamic batcher",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
BATCH_WAIT = Histogram(
    "clinfer_batch_wait_seconds",
    "Time a request waits in the dynamic batcher, from submission to the start of its model call",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
