"""Jobs that fail say where and why; jobs lost before the queue are re-enqueued; batch Bundles go entry by entry."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy.exc import OperationalError

from service.flows import analysis, queue
from service.flows.runtime import Runtime
from tests.conftest import Tokens
from tests.factories import dx_instance, multipart_related, observation, patient_bundle


def _post(client: TestClient, tokens: Tokens, parts: list[bytes]) -> Any:
    body, content_type = multipart_related(parts)
    return client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )


def _wait_job(client: TestClient, job_id: str, headers: dict[str, str], states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job never reached {states}: {job}")


def test_undecodable_pixels_fail_the_job_at_preprocess(client: TestClient, tokens: Tokens) -> None:
    import io

    ds = dcmread(io.BytesIO(dx_instance(size=256)))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not really a codestream"])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert _post(client, tokens, [buffer.getvalue()]).status_code == 200
    analyze = client.post(f"/v1/studies/{ds.StudyInstanceUID}/analyze", headers=tokens.header("clinician"))
    job = _wait_job(client, analyze.json()["jobs"][0]["id"], tokens.header("admin"), {"failed", "succeeded"})
    assert job["state"] == "failed"
    assert job["stage"] == "preprocess"
    assert job["error"]["code"] == "dicom-rejected"
    study = client.get(f"/v1/studies/{ds.StudyInstanceUID}", headers=tokens.header("clinician")).json()
    assert study["status"] == "failed"
    metrics = client.get("/metrics", headers=tokens.header("admin")).text
    assert 'clinfer_job_failures_total{code="dicom-rejected",model="cxr-fusion",stage="preprocess"}' in metrics


def test_a_study_no_model_applies_to_is_recorded_as_no_route(client: TestClient, tokens: Tokens) -> None:
    study_uid = generate_uid()
    assert _post(client, tokens, [dx_instance(study_uid=study_uid, body_part="KNEE", size=256)]).status_code == 200
    analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
    assert analyze.status_code == 202
    assert analyze.json()["status"] == "no-route" and analyze.json()["jobs"] == []
    assert "no model applies" in analyze.json()["reason"]


def test_a_job_committed_while_the_broker_was_down_is_reconciled(
    client: TestClient, tokens: Tokens, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid = generate_uid()
    assert _post(client, tokens, [dx_instance(study_uid=study_uid, size=256)]).status_code == 200

    def broker_down(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(queue, "send", broker_down)
        analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
        assert analyze.status_code == 202
        job_id = analyze.json()["jobs"][0]["id"]
        time.sleep(1)
        assert client.get(f"/v1/jobs/{job_id}", headers=tokens.header("admin")).json()["state"] == "queued"
        runtime.settings.reconcile_after_seconds = 0.01
        time.sleep(0.05)
        assert "1 jobs not progressing" in client.get("/readyz").json()["checks"]["workers"]
    analysis.sweep(runtime)
    runtime.settings.reconcile_after_seconds = 300  # one reconciliation, not one every sweep
    job = _wait_job(client, job_id, tokens.header("admin"), {"succeeded", "failed"})
    assert job["state"] == "succeeded"


def test_batch_bundle_stores_good_entries_and_reports_bad_ones(client: TestClient, tokens: Tokens) -> None:
    bundle = patient_bundle(bundle_type="batch", values={"heart_rate": 88})
    patient_url = bundle["entry"][0]["fullUrl"]
    bad = observation(patient_url, "crp", 12.0)
    bad["resource"]["valueQuantity"]["value"] = "high"
    bundle["entry"].append(bad)
    response = client.post("/fhir", json=bundle, headers=tokens.header("ingest"))
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["201 Created", "201 Created", "400 Bad Request"]
    assert response.json()["entry"][2]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    location = response.json()["entry"][0]["response"]["location"]
    patient = client.get(f"/fhir/{location.rsplit('/_history', 1)[0]}", headers=tokens.header("clinician"))
    assert patient.status_code == 200 and patient.json()["gender"] == "male"


def test_a_batch_entry_that_fails_unexpectedly_fails_alone(
    client: TestClient, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose write raises something other than a refusal (a defect, the database gone for a moment) is
    answered on its own, as 500 or 503 with an OperationOutcome, and the entries written before it are answered
    too. Before, the whole request was a 500 while those entries stayed stored: written, and never reported."""
    from service.store import clinical

    failures = iter([RuntimeError("a bug"), OperationalError("INSERT ...", {}, Exception("connection lost"))])

    def broken(**kwargs: Any) -> None:
        raise next(failures)

    monkeypatch.setattr(clinical, "put_condition", broken)
    bundle = patient_bundle(bundle_type="batch", values={"heart_rate": 88})
    patient_url = bundle["entry"][0]["fullUrl"]
    condition = {
        "resource": {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
            },
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "13645005"}]},
            "subject": {"reference": patient_url},
        },
        "request": {"method": "POST", "url": "Condition"},
    }
    bundle["entry"] += [condition, condition]
    response = client.post("/fhir", json=bundle, headers=tokens.header("ingest"))
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    statuses = [e["response"]["status"] for e in entries]
    assert statuses == ["201 Created", "201 Created", "500 Internal Server Error", "503 Service Unavailable"]
    assert all(e["response"]["outcome"]["resourceType"] == "OperationOutcome" for e in entries[2:])


def test_an_unexpected_error_fails_the_job_visibly(
    client: TestClient, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.inference import pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug in post-processing")

    monkeypatch.setattr(pipeline, "post_process", broken)
    study_uid = generate_uid()
    assert _post(client, tokens, [dx_instance(study_uid=study_uid, size=256)]).status_code == 200
    analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
    job = _wait_job(client, analyze.json()["jobs"][0]["id"], tokens.header("admin"), {"failed", "succeeded"})
    assert (job["state"], job["stage"], job["error"]["code"]) == ("failed", "infer", "internal")
    assert "ValueError" in job["error"]["message"] and "a bug" not in job["error"]["message"]


def test_unusable_prepared_inputs_are_prepared_again(
    client: TestClient, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-off blob the infer stage cannot read (written by another version, damaged) sends the job back to
    pre-processing instead of failing it or feeding the model garbage."""
    from service.inference import pipeline

    real = pipeline.encode_prepared
    calls: list[int] = []

    def first_one_damaged(prepared: pipeline.PreparedInputs) -> bytes:
        calls.append(1)
        return b"PK\x03\x04 an npz of an earlier version" if len(calls) == 1 else real(prepared)

    monkeypatch.setattr(pipeline, "encode_prepared", first_one_damaged)
    study_uid = generate_uid()
    assert _post(client, tokens, [dx_instance(study_uid=study_uid, size=256)]).status_code == 200
    analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
    job = _wait_job(client, analyze.json()["jobs"][0]["id"], tokens.header("admin"), {"failed", "succeeded"})
    assert job["state"] == "succeeded"
    assert len(calls) == 2  # pre-processed twice
    report = client.get(f"/v1/studies/{study_uid}/report", headers=tokens.header("clinician"))
    assert report.status_code == 200 and len(report.json()["reports"][0]["findings"]) == 5


@pytest.mark.parametrize("where", ["database", "disk"])
def test_an_object_that_meets_an_outage_is_refused_for_now(
    client: TestClient, tokens: Tokens, runtime: Runtime, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The database (at the duplicate check) or the disk (writing the file) fails for a moment. Before, that raised
    out of the store: STOW-RS answered 500 and a DICOM association 0xC211. Now the object is refused with "Out of
    Resources" (0xA700), which senders try again later, and nothing is kept."""
    import errno

    from service.store import studies

    if where == "database":

        def unavailable(**kwargs: Any) -> Any:
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection unexpectedly"))

        monkeypatch.setattr(studies, "get_instance", unavailable)
    else:

        def full(key: str, data: bytes, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(runtime.blobs, "put_bytes", full)
    response = _post(client, tokens, [dx_instance(size=64)])
    assert response.status_code == 409, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    monkeypatch.undo()
    found = client.get("/dicomweb/studies", headers=tokens.header("clinician"))
    assert found.status_code == 204 or found.json() == [], found.text
