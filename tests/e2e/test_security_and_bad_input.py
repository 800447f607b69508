"""Auth (401/403, each denial audited), bad input in the protocol's own shape, and the audit chain."""

from __future__ import annotations

import io
import re
from typing import Any

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from service.api.main import create_app
from service.cli import main as clinfer
from service.config import Settings
from service.flows.runtime import Runtime
from service.store.tables import AuditEvent, FhirResource, Instance, Observation, Patient
from tests.conftest import Tokens
from tests.factories import dx_instance, multipart_related, patient_bundle


def _denials(runtime: Runtime) -> list[AuditEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == "access.denied")))


def test_no_token_is_401_and_audited(client: TestClient, runtime: Runtime) -> None:
    response = client.get("/v1/studies")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthenticated"
    fhir = client.get("/fhir/DiagnosticReport/x", headers={"Authorization": "Bearer not-a-jwt"})
    assert fhir.status_code == 401
    assert fhir.json()["resourceType"] == "OperationOutcome"
    denials = _denials(runtime)
    assert [d.actor for d in denials] == ["unauthenticated", "unauthenticated"]
    assert all(d.outcome == "4" for d in denials)


def test_token_from_another_key_is_401(client: TestClient, tmp_path: object, settings: Settings) -> None:
    from service.api.auth import mint_token

    other = settings.model_copy(update={"auth_dev_key_path": settings.state_dir / "other-key.pem"})
    token = mint_token(other, role="admin")
    assert client.get("/v1/audit", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_wrong_role_is_403_and_audited(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    body, content_type = multipart_related([dx_instance()])
    stow = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("clinician")}
    )
    assert stow.status_code == 403
    report = client.get(f"/v1/studies/{generate_uid()}/report", headers=tokens.header("ingest"))
    assert report.status_code == 403
    fhir_report = client.get("/fhir/DiagnosticReport/abc", headers=tokens.header("ingest"))
    assert fhir_report.status_code == 403 and fhir_report.json()["resourceType"] == "OperationOutcome"
    audit_list = client.get("/v1/audit", headers=tokens.header("clinician"))
    assert audit_list.status_code == 403
    denials = _denials(runtime)
    assert [(d.actor_role, d.entity_ref) for d in denials] == [
        ("clinician", "POST /dicomweb/studies"),
        ("ingest", "GET /v1/studies/{study_instance_uid}/report"),
        ("ingest", "GET /fhir/{resource_type}/{resource_id}"),
        ("clinician", "GET /v1/audit"),
    ]
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0, "a refused STOW stores nothing"
    listed = client.get("/v1/audit", params={"event_type": "access.denied"}, headers=tokens.header("admin"))
    assert listed.status_code == 200
    assert len(listed.json()["events"]) == 4


def test_health_is_open_and_metrics_need_a_token(client: TestClient, tokens: Tokens) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["models"] == ["ct-head-ich", "cxr-fusion"]
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=tokens.header("ingest")).status_code == 403
    metrics = client.get("/metrics", headers=tokens.header("admin"))
    assert metrics.status_code == 200
    assert "clinfer_http_requests_total" in metrics.text


def test_a_bundle_beyond_the_token_s_scopes_is_403_audited_and_writes_nothing(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    response = client.post("/fhir", json=patient_bundle(), headers=tokens.header("clinician"))
    assert response.status_code == 403, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert [(d.actor_role, d.entity_ref) for d in _denials(runtime)] == [("clinician", "POST /fhir")]
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Patient.id))) == 0, "a refused Bundle writes nothing"


def test_the_embedded_service_warms_its_models_up_before_it_says_ready(runtime: Runtime) -> None:
    import time

    from service.api.main import create_app

    with TestClient(create_app(runtime, warm_up=True)) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            assert ready.json()["checks"]["warm_up"] == "in progress", ready.text  # not ready for another reason
            time.sleep(0.05)
        assert ready.json()["checks"]["warm_up"] == "done", ready.text
        # every model's session and batcher exist before the first study needs them
        expected = sorted((name, m.manifest.latest().version) for name, m in runtime.registry.models.items())
        assert sorted(runtime.batchers.loaded()) == expected


def test_stow_with_a_corrupt_part_stores_the_others(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    study_uid = generate_uid()
    good = [dx_instance(study_uid=study_uid, seed=i) for i in range(2)]
    truncated_uid = generate_uid()
    truncated = dx_instance(study_uid=study_uid, sop_uid=truncated_uid, seed=5)[:-20000]
    garbage = b"this is not a DICOM file" * 40
    body, content_type = multipart_related([good[0], truncated, garbage, good[1]])
    response = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )
    assert response.status_code == 202, response.text
    payload = response.json()
    assert len(payload["00081199"]["Value"]) == 2
    failed = payload["00081198"]["Value"]
    assert len(failed) == 2
    by_part = {item["00000902"]["Value"][0].split(":")[0]: item for item in failed}
    assert by_part["part 2"]["00081155"]["Value"] == [truncated_uid]
    assert by_part["part 2"]["00081197"]["Value"] == [0xC000]
    assert by_part["part 3"]["00081197"]["Value"] == [0xC000]
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 2
    files = (runtime.settings.effective_blob_dir / "instances").rglob("*.dcm")
    assert sorted(p.name.rsplit(".", 2)[0] for p in files) == sorted(  # <SOP Instance UID>.<content hash>.dcm
        i["00081155"]["Value"][0] for i in payload["00081199"]["Value"]
    )


def test_stow_of_an_instance_whose_series_is_another_study_s_is_refused_whole(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    """A modality that reuses a SeriesInstanceUID in a new study (a known fault of some consoles). Before, the
    instance was filed under the first study's series: shown, analyzed and reported with a study its header does
    not name, while its own study stayed empty."""
    first_study, series, second_study = generate_uid(), generate_uid(), generate_uid()
    stored = dx_instance(study_uid=first_study, series_uid=series, seed=1)
    assert _stow(client, tokens, stored).status_code == 200
    sop_uid = generate_uid()
    response = _stow(client, tokens, dx_instance(study_uid=second_study, series_uid=series, sop_uid=sop_uid, seed=2))
    assert response.status_code == 409, response.text
    [failed] = response.json()["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [sop_uid] and failed["00081197"]["Value"] == [0xC000]
    assert "series in another study" in failed["00000902"]["Value"][0]
    clinician = tokens.header("clinician")
    assert client.get(f"/v1/studies/{second_study}", headers=clinician).status_code == 404
    [found] = client.get(f"/dicomweb/studies/{first_study}/series", headers=clinician).json()
    assert found["0020000E"]["Value"] == [series] and found["00201209"]["Value"] == [1]
    with runtime.sessions() as session:
        stored_uids = session.scalars(select(Instance.sop_instance_uid)).all()
    assert stored_uids == [pydicom.dcmread(io.BytesIO(stored)).SOPInstanceUID]
    files = (runtime.settings.effective_blob_dir / "instances").rglob("*.dcm")
    assert [p.name.split(".")[0] for p in files if sop_uid in p.name] == []


def _stow(client: TestClient, tokens: Tokens, part: bytes) -> Any:
    body, content_type = multipart_related([part])
    return client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )


def test_a_passing_database_failure_is_a_503_with_retry_after_in_each_protocol_s_shape(
    runtime: Runtime, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a database error outside the paths that catch it (a REST FHIR write, a transaction Bundle,
    a /v1 route; a deadlock PostgreSQL breaks) was answered 500, which clients do not retry. It is now 503 with
    Retry-After, an OperationOutcome under /fhir."""
    from sqlalchemy.exc import OperationalError

    from service.flows import analysis, fhir

    def database_gone(*args: object, **kwargs: object) -> None:
        raise OperationalError("SELECT pg_advisory_xact_lock(k) ...", {}, Exception("deadlock detected"))

    monkeypatch.setattr(fhir, "write_one", database_gone)
    monkeypatch.setattr(analysis, "request_analysis", database_gone)
    with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
        put = client.put(
            "/fhir/Patient?identifier=urn:oid:1.2.3.4.5|X-1",
            json={"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": "X-1"}]},
            headers=tokens.header("ingest"),
        )
        assert put.status_code == 503 and put.headers["retry-after"] == "5", put.text
        assert put.json()["resourceType"] == "OperationOutcome" and put.json()["issue"][0]["code"] == "transient"
        analyze = client.post(f"/v1/studies/{generate_uid()}/analyze", headers=tokens.header("clinician"))
        assert analyze.status_code == 503 and analyze.json()["error"]["code"] == "transient", analyze.text


def test_stow_request_errors(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    ingest = tokens.header("ingest")
    wrong_type = client.post("/dicomweb/studies", content=b"{}", headers={"Content-Type": "application/json", **ingest})
    assert wrong_type.status_code == 415
    no_boundary = client.post(
        "/dicomweb/studies",
        content=b"x",
        headers={"Content-Type": 'multipart/related; type="application/dicom"', **ingest},
    )
    assert no_boundary.status_code == 400
    body, content_type = multipart_related([dx_instance()])
    truncated = client.post(
        "/dicomweb/studies", content=body[: len(body) // 2], headers={"Content-Type": content_type, **ingest}
    )
    assert truncated.status_code == 400
    assert "closing delimiter" in truncated.json()["error"]["message"]
    other_study = client.post(
        f"/dicomweb/studies/{generate_uid()}", content=body, headers={"Content-Type": content_type, **ingest}
    )
    assert other_study.status_code == 409
    assert other_study.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    runtime.settings.max_upload_bytes = len(body) - 1
    too_large = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type, **ingest})
    assert too_large.status_code == 413
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0


def test_malformed_bundle_is_an_operation_outcome_and_stores_nothing(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    bundle = patient_bundle()
    bundle["entry"][2]["resource"]["valueQuantity"]["value"] = "very high"
    response = client.post("/fhir", json=bundle, headers=tokens.header("ingest"))
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "entry[2]" in outcome["issue"][0]["diagnostics"]
    not_json = client.post(
        "/fhir", content=b"{not json", headers={"Content-Type": "application/fhir+json", **tokens.header("ingest")}
    )
    assert not_json.status_code == 400 and not_json.json()["resourceType"] == "OperationOutcome"
    with runtime.sessions() as session:
        for table in (Patient, Observation, FhirResource):
            assert session.scalar(select(func.count()).select_from(table)) == 0


def test_audit_verify_detects_an_edited_row(
    client: TestClient,
    tokens: Tokens,
    runtime: Runtime,
    settings: Settings,
    monkeypatch: object,
    capsys: object,
) -> None:
    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    body, content_type = multipart_related([dx_instance(seed=i) for i in range(3)])
    assert (
        client.post(
            "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
        ).status_code
        == 200
    )
    client.get("/v1/studies")  # a denial, also in the chain
    mp.setenv("CLINFER_STATE_DIR", str(settings.state_dir))
    from service.config import get_settings

    get_settings.cache_clear()
    assert clinfer(["audit", "verify"]) == 0
    assert "intact: 4 events" in capsys.readouterr().out  # type: ignore[attr-defined]
    with runtime.sessions.begin() as session:
        second = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()[1]
        session.execute(update(AuditEvent).where(AuditEvent.id == second.id).values(actor="someone-else"))
    assert clinfer(["audit", "verify"]) == 1
    assert f"BROKEN at event {second.id}" in capsys.readouterr().out  # type: ignore[attr-defined]


def test_requests_are_measured_by_route_template(client: TestClient, tokens: Tokens) -> None:
    study_uid = generate_uid()
    missing = client.get(f"/v1/studies/{study_uid}/report", headers=tokens.header("clinician"))
    assert missing.status_code == 404
    text = client.get("/metrics", headers=tokens.header("admin")).text
    assert study_uid not in text
    template = re.escape('method="GET",route="/v1/studies/{study_instance_uid}/report"')
    assert re.search(rf'clinfer_http_requests_total\{{{template},status="404"\}} [1-9]', text)
    assert re.search(rf"clinfer_http_request_duration_seconds_count\{{{template}\}} [1-9]", text)


def test_a_token_with_an_unreadable_scope_claim_is_401_and_audited(
    client: TestClient, settings: Settings, runtime: Runtime
) -> None:
    """Found in review: a validly signed token whose ``scope`` is a number was answered 500."""
    import datetime as dt

    import jwt

    from service.api.auth import ensure_dev_key

    claims = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": "odd-scopes",
        "exp": dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
        "scope": 123,
    }
    token = jwt.encode(claims, ensure_dev_key(settings.effective_dev_key_path), algorithm="ES256")
    for path in ("/fhir/Patient", "/v1/studies"):
        response = client.get(path, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Bearer")
    denials = _denials(runtime)
    assert [(d.actor, d.detail["reason"]) for d in denials] == [("unauthenticated", "unauthenticated")] * 2


def test_patient_scopes_do_not_open_metrics(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    """Found in review: /metrics counted SMART patient/ scopes, unlike every other route that does not narrow to
    the token's patient (``require``). It takes user/ or system/ Device.r only."""
    from service.api.auth import mint_token

    token = mint_token(tokens.settings, role="clinician", scopes=("patient/Device.rs", "patient/*.rs"), patient="p-1")
    refused = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403 and "patient/ scopes" in refused.json()["error"]["message"], refused.text
    assert [(d.entity_ref, d.detail["reason"]) for d in _denials(runtime)] == [("GET /metrics", "forbidden")]
    wide = mint_token(tokens.settings, role="clinician", scopes=("user/Device.r",))
    assert client.get("/metrics", headers={"Authorization": f"Bearer {wide}"}).status_code == 200
