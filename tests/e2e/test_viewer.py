"""The viewer's and the operations page's responses (security headers, redirects, static files served with their
media types, nothing else served) and what the pages read from /v1 (worklist fields, jobs by state, models)."""

from __future__ import annotations

import re
import threading
import time

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import event, select

from service.api.routes import ui
from service.api.routes.v1 import studies_json
from service.flows.runtime import Runtime
from service.schemas import Principal
from service.store import studies
from service.store.tables import AuditEvent
from tests.conftest import Tokens
from tests.e2e.test_embedded_spine import post_study, wait_for_report
from tests.factories import dx_instance, patient_bundle

EXPECTED_CSP = {
    "default-src 'self'",
    "img-src 'self' blob: data:",
    "object-src 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
}


def assert_security_headers(headers: dict[str, str] | object) -> None:
    csp = {part.strip() for part in headers["content-security-policy"].split(";")}  # type: ignore[index]
    assert EXPECTED_CSP <= csp
    assert not any("unsafe" in part for part in csp), "no inline script or style"
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]
    assert headers["referrer-policy"] == "no-referrer"  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/ui/", "text/html"),
        ("/ui/ops", "text/html"),
        ("/ui/static/common.js", "text/javascript"),
        ("/ui/static/viewer.js", "text/javascript"),
        ("/ui/static/ops.js", "text/javascript"),
        ("/ui/static/viewer.css", "text/css"),
    ],
)
def test_pages_are_served_without_a_token_with_security_headers(client: TestClient, path: str, media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert_security_headers(response.headers)
    assert response.content


def test_root_redirects_to_the_viewer(client: TestClient) -> None:
    for path in ("/", "/ui"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/ui/"
        assert_security_headers(response.headers)
    assert client.get("/").url.path == "/ui/"


@pytest.mark.parametrize("name", ["nope.js", "..%2Fmain.py", "%2E%2E%2F%2E%2E%2Fconfig.py", "index.HTML", "ui.py"])
def test_nothing_else_is_served(client: TestClient, name: str) -> None:
    response = client.get(f"/ui/static/{name}")
    assert response.status_code == 404
    assert "error" in response.json()


def test_the_pages_hold_no_inline_script_style_or_markup_from_data() -> None:
    for name in ui.STATIC_FILES:
        text = ui._content(name).decode()
        if name.endswith(".html"):
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), f"inline script in {name}"
            assert "<style" not in text and " style=" not in text, f"inline style in {name}"
            assert not re.search(r"\bon[a-z]+=", text), f"inline handler in {name}"
            assert "http://" not in text and "https://" not in text, f"something fetched from elsewhere in {name}"
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
                assert sink not in text, f"{sink} in {name}"
            assert "localStorage" not in text, "the token stays in sessionStorage"
            assert not re.search(r"https?://", text), f"something fetched from elsewhere in {name}"


def test_studies_carry_what_the_worklist_shows(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    study_uid = generate_uid()
    assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
    assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
    clinician = tokens.header("clinician")
    before = client.get(f"/v1/studies/{study_uid}", headers=clinician).json()
    assert before["modalities"] == ["DX"]
    assert before["accession_number"].startswith("ACC")
    assert before["dicom_patient_id"] == "MRN-1001" and before["issuer_of_patient_id"] == "urn:oid:1.2.3.4.5"
    assert before["reports"] == []

    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=clinician).status_code == 202
    [report] = wait_for_report(client, study_uid, clinician)["reports"]
    listed = client.get("/v1/studies", headers=clinician).json()["studies"]
    [study] = [s for s in listed if s["study_instance_uid"] == study_uid]
    assert study["modalities"] == ["DX"], "our SR and heatmap are not the study's modalities"
    [summary] = study["reports"]
    assert summary["model"] == "cxr-fusion" and summary["version"] == 1 and summary["id"] == report["id"]
    assert summary["positive_findings"] == [f["display"] for f in report["findings"] if f["positive"]]

    # a principal who may read studies but not reports is not shown their findings
    with runtime.sessions.begin() as session:
        row = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        narrow = Principal(subject="t", scopes=frozenset({"user/ImagingStudy.rs"}))
        [body], disclosed = studies_json(session, [row], narrow)
    assert body["reports"] is None and body["modalities"] == ["DX"] and disclosed == []


def test_the_worklist_reads_a_page_in_as_many_statements_whatever_its_size_and_audits_the_findings_shown(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    """Found in review: each study of a page cost its own SELECTs (instances, jobs, patient): 21 statements for 5
    studies, 106 for 50. And the reports' positive findings a page shows were disclosed with no report named in
    the audit trail."""
    assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
    for seed in range(6):
        assert post_study(client, tokens, [dx_instance(seed=seed, size=256)]).status_code == 200
    clinician = tokens.header("clinician")
    study_uid = client.get("/v1/studies", params={"limit": 1}, headers=clinician).json()["studies"][0][
        "study_instance_uid"
    ]
    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=clinician).status_code == 202
    [report] = wait_for_report(client, study_uid, clinician)["reports"]
    deadline = time.monotonic() + 60
    while report["dicom"]["state"] not in ("stored", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)  # the DICOM results are made after the report; nothing else runs once they are
        [report] = client.get(f"/v1/studies/{study_uid}/report", headers=clinician).json()["reports"]

    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if threading.current_thread().name.startswith("AnyIO worker"):  # the route's; not the sweeper's, say
            statements.append(statement)

    per_page = []
    event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        for limit in (2, 6):
            del statements[:]
            assert len(client.get("/v1/studies", params={"limit": limit}, headers=clinician).json()["studies"]) == limit
            per_page.append(len(statements))
    finally:
        event.remove(runtime.engine, "before_cursor_execute", count)
    assert per_page[0] == per_page[1] > 5, per_page
    with runtime.sessions() as session:
        searches = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "study.search").order_by(AuditEvent.id.desc())
        ).all()
    assert searches[0].detail["reports"] == [report["id"]]


def test_jobs_by_state_and_loaded_models(client: TestClient, tokens: Tokens) -> None:
    admin = tokens.header("admin")
    assert client.get("/v1/jobs", headers=admin).json()["counts"] == {}
    study_uid = generate_uid()
    assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician")).status_code == 202
    wait_for_report(client, study_uid, tokens.header("clinician"))
    body = client.get("/v1/jobs?limit=1", headers=admin).json()
    assert body["counts"] == {"succeeded": 1} and len(body["jobs"]) == 1
    assert body["jobs"][0]["study_instance_uid"] == study_uid  # the ops page links a failed job to its study
    models = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["models"]}
    [version] = models["cxr-fusion"]["versions"]
    assert version["loaded"] is True and version["execution_provider"] == "CPUExecutionProvider"
    assert all(not v["loaded"] and v["execution_provider"] is None for v in models["ct-head-ich"]["versions"])


def test_job_list_pages_and_refuses_an_unknown_state(client: TestClient, tokens: Tokens) -> None:
    admin = tokens.header("admin")
    uids = [generate_uid() for _ in range(3)]
    for study_uid in uids:
        assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
        assert client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician")).status_code == 202
        wait_for_report(client, study_uid, tokens.header("clinician"))
    pages = [client.get(f"/v1/jobs?limit=2&offset={offset}", headers=admin).json()["jobs"] for offset in (0, 2)]
    assert [len(page) for page in pages] == [2, 1]
    assert [job["study_instance_uid"] for page in pages for job in page] == uids[::-1]
    assert client.get("/v1/jobs?state=succeeded&offset=3", headers=admin).json()["jobs"] == []
    refused = client.get("/v1/jobs?state=done", headers=admin)
    assert refused.status_code == 400 and "queued" in refused.json()["error"]["message"]
