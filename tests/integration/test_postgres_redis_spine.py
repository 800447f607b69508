"""The spine in its production shape: PostgreSQL, Redis, `clinfer serve` and a separate `clinfer worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select

from service.api.auth import mint_token
from service.config import Settings
from service.results.fhir import validate_resource
from service.store.tables import AuditEvent, Job, Report
from tests.conftest import REPO, free_port
from tests.factories import dx_instance, multipart_related, patient_bundle

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def _clinfer() -> list[str]:
    return [sys.executable, "-m", "service.cli"]


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str, redis_url: str
) -> Iterator[tuple[str, dict[str, str], Path]]:
    pool = getattr(request, "param", "threads")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLINFER_")},
        "CLINFER_DATABASE_URL": postgres_url,
        "CLINFER_BROKER_URL": redis_url,
        "CLINFER_STATE_DIR": str(tmp_path / "var"),
        "CLINFER_BLOB_DIR": str(tmp_path / "blobs"),
        "CLINFER_MODEL_REPOSITORY": str(REPO / "models"),
        "CLINFER_PORT": str(port),
        "CLINFER_WORKER_METRICS_PORT": str(free_port()),
        "CLINFER_STUDY_STABLE_SECONDS": "3600",
        "PYTHONPATH": str(REPO),
    }
    subprocess.run([*_clinfer(), "db", "upgrade"], env=env, check=True, cwd=tmp_path, timeout=120)
    logs = tmp_path / "logs"
    logs.mkdir()
    api = subprocess.Popen(
        [*_clinfer(), "serve"], env=env, cwd=tmp_path, stdout=(logs / "api.log").open("w"), stderr=subprocess.STDOUT
    )
    worker = subprocess.Popen(
        [*_clinfer(), "worker", "--queues", "preprocess,infer,results", "--concurrency", "1", "--pool", pool],
        env=env,
        cwd=tmp_path,
        stdout=(logs / "worker.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None:
                raise AssertionError("clinfer serve did not become ready:\n" + (logs / "api.log").read_text())
            time.sleep(0.3)
        yield base, env, logs
    finally:
        for process in (api, worker):
            process.send_signal(signal.SIGTERM)
        for process in (api, worker):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def test_spine_on_postgres_and_redis_with_a_separate_worker(stack: tuple[str, dict[str, str], Path]) -> None:
    base, env, logs = stack
    settings = Settings(state_dir=Path(env["CLINFER_STATE_DIR"]))

    def headers(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(settings, role=role)}"}

    study_uid = generate_uid()
    body, content_type = multipart_related([dx_instance(study_uid=study_uid, seed=3, findings={"cardiomegaly": True})])
    with httpx.Client(base_url=base, timeout=30) as http:
        stored = http.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **headers("ingest")}
        )
        assert stored.status_code == 200, stored.text
        assert (
            http.post(
                "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **headers("ingest")}
            ).status_code
            == 200
        )
        bundle = http.post("/fhir", json=patient_bundle(seed=3), headers=headers("ingest"))
        assert bundle.status_code == 200, bundle.text
        ready = http.get("/readyz").json()
        assert ready["checks"]["broker"] == "ok" and ready["checks"]["database"] == "ok"

        analyze = http.post(f"/v1/studies/{study_uid}/analyze", headers=headers("clinician"))
        assert analyze.status_code == 202, analyze.text
        job_id = analyze.json()["jobs"][0]["id"]

        deadline = time.monotonic() + 90
        while True:
            report = http.get(f"/v1/studies/{study_uid}/report", headers=headers("clinician"))
            if report.status_code == 200:
                break
            job = http.get(f"/v1/jobs/{job_id}", headers=headers("admin")).json()
            assert job["state"] != "failed", job
            if time.monotonic() > deadline:
                raise AssertionError(f"no report; job {job}\n" + (logs / "worker.log").read_text()[-4000:])
            time.sleep(0.3)
        [found] = report.json()["reports"]
        assert len(found["findings"]) == 5
        assert found["patient"] is not None
        resource = http.get(f"/fhir/DiagnosticReport/{found['id']}", headers=headers("clinician")).json()
        validate_resource(resource)
        assert resource["status"] == "preliminary"

        # the DICOM results are made by the worker on the results queue and served by the API
        while found["dicom"]["state"] != "stored":
            assert found["dicom"]["state"] == "pending" and time.monotonic() < deadline, found["dicom"]
            time.sleep(0.3)
            found = http.get(f"/v1/studies/{study_uid}/report", headers=headers("clinician")).json()["reports"][0]
        sr = http.get(found["dicom"]["sr"]["wado_rs"], headers=headers("clinician"))
        assert sr.status_code == 200 and sr.headers["content-type"].startswith("multipart/related")

        # the same task delivered twice through Redis: still one report
        sender = Celery(broker=env["CLINFER_BROKER_URL"])
        sender.send_task("service.worker.tasks.infer", args=[job_id], queue="infer")
        sender.send_task("service.worker.tasks.preprocess", args=[job_id], queue="preprocess")
        time.sleep(3)
        http.post(f"/v1/studies/{study_uid}/analyze", headers=headers("clinician"))

    engine = create_engine(env["CLINFER_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count(Report.id))) == 1
            assert connection.scalar(select(func.count(Job.id))) == 1
            assert connection.scalar(select(Job.state)) == "succeeded"
            types = set(connection.scalars(select(AuditEvent.event_type)))
        assert {"dicom.store", "fhir.bundle", "study.analyze", "report.create", "report.read"} <= types
    finally:
        engine.dispose()
    worker_metrics = httpx.get(f"http://127.0.0.1:{env['CLINFER_WORKER_METRICS_PORT']}/metrics", timeout=5).text
    assert 'clinfer_inference_duration_seconds_count{model="cxr-fusion"' in worker_metrics
    assert 'clinfer_reports_total{model="cxr-fusion",version="1"} 1.0' in worker_metrics
    for stage in ("queue_wait_preprocess", "preprocess", "queue_wait_infer", "batch_wait", "inference", "report"):
        assert f'clinfer_job_stage_seconds_count{{model="cxr-fusion",stage="{stage}"}} 1.0' in worker_metrics, stage
    verify = subprocess.run([*_clinfer(), "audit", "verify"], env=env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize("stack", ["prefork"], indirect=True)
def test_a_prefork_worker_loads_its_models_in_each_child(stack: tuple[str, dict[str, str], Path]) -> None:
    """``clinfer worker --pool prefork``: before, the models and their batchers were loaded in the parent process,
    whose batcher threads a forked child does not have; every inference waited for its batch until it timed out,
    and no study was ever reported. Now each child loads its own, once forked."""
    base, env, logs = stack
    settings = Settings(state_dir=Path(env["CLINFER_STATE_DIR"]))

    def headers(role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(settings, role=role)}"}

    study_uid = generate_uid()
    body, content_type = multipart_related([dx_instance(study_uid=study_uid, size=256)])
    with httpx.Client(base_url=base, timeout=60) as http:
        stored = http.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **headers("ingest")}
        )
        assert stored.status_code == 200, stored.text
        analyze = http.post(f"/v1/studies/{study_uid}/analyze", headers=headers("clinician"))
        assert analyze.status_code == 202, analyze.text
        report = http.get(f"/v1/studies/{study_uid}/report", params={"wait": 45}, headers=headers("clinician"))
        assert report.status_code == 200, (logs / "worker.log").read_text()[-4000:]
        assert report.json()["reports"][0]["findings"]
