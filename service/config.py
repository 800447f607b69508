"""Settings: the only reader of the environment (prefix ``CLINFER_``).

Validated at start-up; unsafe combinations (auth off on a non-loopback bind) refuse to start.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PACKAGE_ROOT = Path(__file__).resolve().parent


def _default_model_repository() -> Path:
    # A source checkout keeps models/ beside service/; an installed wheel does not ship them, so the
    # working directory's models/ is the fallback.
    beside = _PACKAGE_ROOT.parent / "models"
    return beside if beside.is_dir() else Path("models")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every setting of a deployment. See DESIGN.md, "Settings every deployment uses"."""

    model_config = SettingsConfigDict(env_prefix="CLINFER_", extra="ignore")

    state_dir: Path = Field(default=Path("var"), description="embedded state: SQLite file, blobs, dev signing key")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under state_dir")
    broker_url: str | None = Field(default=None, description="Celery broker; unset runs the embedded in-process worker")
    blob_dir: Path | None = Field(default=None, description="DICOM objects and results; default state_dir/blobs")
    model_repository: Path = Field(default_factory=_default_model_repository)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(
        default=1, ge=1, le=64, description="`clinfer serve` processes (more than one needs CLINFER_BROKER_URL)"
    )
    dimse_port: int = Field(default=11112, ge=1, le=65535)
    dimse_ae_title: str = "CLINFER"
    dimse_host: str = "127.0.0.1"
    dimse_allowed_calling_ae_titles: list[str] = Field(default_factory=list, description="empty: any calling AE")
    dimse_max_associations: int = Field(default=10, ge=1)
    dimse_acse_timeout: float = Field(
        default=30, gt=0, le=600, description="seconds the listener waits for an association request or release"
    )
    dimse_network_timeout: float = Field(
        default=60, gt=0, le=3600, description="seconds a silent peer keeps its association, or a PDU half sent"
    )
    dimse_embedded: bool = Field(default=True, description="`clinfer serve` on the embedded default also listens")
    dimse_tls_cert: Path | None = Field(default=None, description="PEM certificate: the DICOM listener speaks TLS")
    dimse_tls_key: Path | None = Field(default=None, description="PEM private key of dimse_tls_cert")
    dimse_tls_ca: Path | None = Field(
        default=None, description="PEM CA bundle: when set, calling AEs must present a certificate it signed"
    )

    routing_rules: Path | None = Field(
        default=None, description="YAML routing rules and destinations; unset: each model's manifest routing"
    )
    dicom_results: bool = Field(
        default=True, description="make a DICOM SR and an occlusion heatmap Secondary Capture for each report version"
    )
    # With the defaults a push is tried for about a day (10 s, 20 s, ... then every 15 min), so that a PACS's
    # maintenance window or restart does not lose the results made meanwhile; `POST /v1/deliveries/retry` re-sends
    # the failed ones once the peer is back.
    delivery_max_attempts: int = Field(default=100, ge=1, description="tries per result push before it is failed")
    delivery_retry_seconds: float = Field(default=10.0, gt=0, description="first back-off between push tries")
    delivery_retry_max_seconds: float = Field(
        default=900.0, gt=0, description="longest back-off between push tries (the back-off doubles up to it)"
    )

    auth_enabled: bool = True
    auth_issuer: str = "clinfer-local"
    auth_audience: str = "clinfer"
    auth_jwks_url: str | None = Field(default=None, description="issuer's JWKS; unset uses the local dev key")
    auth_jwks_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="longest wait for the issuer's JWKS; a failed fetch is tried again 30 s later at the soonest, "
        "and the last key set fetched keeps verifying tokens meanwhile",
    )
    auth_dev_key_path: Path | None = Field(default=None, description="default state_dir/dev-signing-key.pem")
    worker_metrics_port: int | None = Field(
        default=9101, description="`clinfer worker` serves /metrics here (unauthenticated: bind to a scrape network)"
    )
    metrics_public: bool = Field(default=False, description="serve /metrics without a token (scrape network only)")

    study_stable_seconds: float = Field(default=30.0, ge=0)
    analyze_unordered: bool = Field(
        default=True,
        description="analyze every stable study; false: only studies with an AI-read order (FHIR ServiceRequest)"
        " or an explicit request",
    )
    completeness_scan_seconds: float = Field(default=5.0, gt=0)
    reconcile_after_seconds: float = Field(default=300.0, gt=0)
    # A job is lost once it has not moved for reconcile_after_seconds; each re-send gives its stage Celery's own
    # retries again. With the defaults a stage that keeps failing for a moment (a full disk, the database away)
    # is tried for about half an hour before the job fails with "retries-exhausted": time for an operator, and no
    # job active for ever. A job is not sent again (nor counted) while the broker cannot be read.
    job_max_resends: int = Field(
        default=5,
        ge=1,
        description="times the reconciler sends a lost job (one that stopped moving in an active state) again before"
        " it fails the job",
    )

    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_instances_per_request: int = Field(default=5000, gt=0)
    max_fhir_bundle_bytes: int = Field(default=32 * 1024**2, gt=0)
    max_decoded_pixels: int = Field(default=16384 * 16384, gt=0)

    api_threads: int = Field(
        default=4,
        ge=1,
        description="threads of each API process for its blocking work (database, files): one runs Python at a "
        "time, the others overlap their waits; more cost CPU in switching (README, Performance)",
    )
    worker_concurrency: int = Field(
        default=8, ge=1, description="task threads of the embedded worker (and `clinfer worker`'s default)"
    )
    batching: bool = Field(default=True, description="dynamic batching of inference requests in each worker")
    batch_max_size: int | None = Field(default=None, ge=1, description="overrides the manifests' max_batch_size")
    batch_max_delay_ms: float | None = Field(
        default=None, ge=0, le=1000, description="overrides the manifests' max_delay_ms"
    )
    batch_timeout_seconds: float = Field(
        default=60.0, gt=0, description="longest wait for a place in a batch before the infer task is retried"
    )

    execution_providers: list[str] = Field(
        default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference; unavailable ones are skipped. "
        '"TensorRTNative" first: a plan from `clinfer models build-trt` for this GPU, when there is one',
    )
    cpu_threads: int | None = Field(default=None, ge=1, description="ONNX Runtime CPU threads; default: the CPUs")
    cpu_spin: bool = Field(
        default=False,
        description="let ONNX Runtime's CPU threads spin between model calls: a little lower latency on a machine "
        "that only runs the model, a core's worth of CPU taken from everything else on it",
    )
    trt_fp16: bool = Field(default=True, description="TensorRT engines and plans in FP16")
    engine_cache_dir: Path | None = Field(
        default=None, description="TensorRT engine caches when the model repository is read-only"
    )

    def model_registry_options(self) -> dict[str, Any]:
        """The ModelRegistry arguments these settings choose."""
        return {
            "root": self.model_repository,
            "providers": list(self.execution_providers),
            "cpu_threads": self.cpu_threads,
            "cpu_spin": self.cpu_spin,
            "trt_fp16": self.trt_fp16,
            "batch_max_size": self.batch_max_size,
            "cache_root": self.engine_cache_dir,
        }

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.api_workers > 1 and not self.broker_url:
            raise ValueError(
                "CLINFER_API_WORKERS above 1 needs CLINFER_BROKER_URL: the embedded worker lives in one process"
            )
        if (self.dimse_tls_cert is None) != (self.dimse_tls_key is None):
            raise ValueError("CLINFER_DIMSE_TLS_CERT and CLINFER_DIMSE_TLS_KEY are set together or not at all")
        if self.dimse_tls_ca is not None and self.dimse_tls_cert is None:
            raise ValueError("CLINFER_DIMSE_TLS_CA needs CLINFER_DIMSE_TLS_CERT and CLINFER_DIMSE_TLS_KEY")
        if not self.auth_enabled and not _is_loopback(self.host):
            raise ValueError(
                f"CLINFER_AUTH_ENABLED=false is only allowed on a loopback bind, not CLINFER_HOST={self.host!r}"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.state_dir / 'clinfer.db').resolve()}"

    @property
    def effective_blob_dir(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.state_dir / "blobs"

    @property
    def effective_dev_key_path(self) -> Path:
        return self.auth_dev_key_path if self.auth_dev_key_path is not None else self.state_dir / "dev-signing-key.pem"

    @property
    def embedded_worker(self) -> bool:
        return not self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
