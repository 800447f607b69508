"""The whole path on the embedded default: STOW-RS + FHIR Bundle in, analysis through Celery, report out."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.flows import analysis
from service.flows.runtime import Runtime
from service.results.fhir import validate_resource
from service.store import reports
from service.store.tables import Report, Study
from tests.conftest import Tokens
from tests.factories import dx_instance, multipart_related, patient_bundle

FINDING_CODES = {"233604007", "8186001", "60046008", "19242006", "36118008"}


def wait_for_report(client: TestClient, study_uid: str, headers: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/v1/studies/{study_uid}/report", headers=headers)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 404, response.text
        time.sleep(0.2)
    raise AssertionError(f"no report within {timeout}s: {client.get(f'/v1/studies/{study_uid}', headers=headers).text}")


def post_study(client: TestClient, tokens: Tokens, parts: list[bytes]) -> Any:
    body, content_type = multipart_related(parts)
    return client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )


def test_study_and_bundle_in_report_out(client: TestClient, tokens: Tokens, runtime: Runtime) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    instances = [
        dx_instance(study_uid=study_uid, series_uid=series_uid, seed=i, instance_number=i + 1) for i in range(2)
    ]
    stored = post_study(client, tokens, instances)
    assert stored.status_code == 200, stored.text
    assert stored.headers["content-type"].startswith("application/dicom+json")
    assert len(stored.json()["00081199"]["Value"]) == 2

    bundle = client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest"))
    assert bundle.status_code == 200, bundle.text
    assert bundle.json()["type"] == "transaction-response"
    assert all(e["response"]["status"] == "201 Created" for e in bundle.json()["entry"])

    analyze = client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
    assert analyze.status_code == 202, analyze.text
    assert [j["model"] for j in analyze.json()["jobs"]] == ["cxr-fusion"]

    clinician = tokens.header("clinician")
    body = wait_for_report(client, study_uid, clinician)
    [report] = body["reports"]
    assert {f["code"] for f in report["findings"]} == FINDING_CODES
    for finding in report["findings"]:
        assert 0.0 <= finding["probability"] <= 1.0
        assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert report["model"]["name"] == "cxr-fusion"
    assert len(report["model"]["sha256"]) == 64
    assert report["model"]["execution_provider"] == "CPUExecutionProvider"
    assert report["patient"] is not None, "the study was joined with its patient by PatientID + issuer"
    used = {v["feature"]: v for v in report["clinical_inputs"]}
    assert used["age"]["value"] > 60 and not used["age"]["missing"]
    crp = used["crp"]
    if not crp["missing"]:
        assert crp["unit"] == "mg/L" and crp["loinc"] == "1988-5"
    assert set(report["missing_inputs"]) == {k for k, v in used.items() if v["missing"]}

    fhir_report = client.get(f"/fhir/DiagnosticReport/{report['id']}", headers=clinician)
    assert fhir_report.status_code == 200
    assert fhir_report.headers["content-type"].startswith("application/fhir+json")
    resource = fhir_report.json()
    validate_resource(resource)
    assert resource["status"] == "preliminary"
    assert len(resource["result"]) == 5
    assert resource["conclusion"].startswith("AI-generated")

    search = client.get("/fhir/DiagnosticReport", params={"subject": report["patient"]}, headers=clinician)
    assert search.status_code == 200
    assert search.json()["type"] == "searchset"
    assert [e["resource"]["id"] for e in search.json()["entry"]] == [report["id"]]

    # the same study again, and the analysis again: still exactly one report
    again = post_study(client, tokens, instances)
    assert again.status_code == 200
    client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician"))
    job_id = analyze.json()["jobs"][0]["id"]
    analysis.infer_job(runtime, job_id)  # a task delivered twice
    with runtime.sessions() as session:
        assert session.query(Report).count() == 1
        study = session.query(Report).one().study_id
        assert len(reports.for_study(session=session, study=session.get(Study, study))) == 1


def test_stable_study_is_analyzed_without_a_request(tmp_path: Any) -> None:
    from service.api.main import create_app
    from service.flows.runtime import build_runtime, set_runtime
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, study_stable_seconds=0.5)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    with TestClient(create_app(runtime)) as client:
        study_uid = generate_uid()
        assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
        body = wait_for_report(client, study_uid, tokens.header("clinician"))
        assert len(body["reports"][0]["findings"]) == 5
        assert body["reports"][0]["patient"] is None
        assert "sex_male" in body["reports"][0]["missing_inputs"]


def test_patient_matching_by_patient_id_and_issuer(client: TestClient, tokens: Tokens) -> None:
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    # the Bundle first, then the study: joined on PatientID + IssuerOfPatientID = identifier system + value
    assert client.post("/fhir", json=patient_bundle(patient_id="MRN-7"), headers=ingest).status_code == 200
    first = generate_uid()
    assert post_study(client, tokens, [dx_instance(study_uid=first, patient_id="MRN-7")]).status_code == 200
    # same PatientID from another issuer: a different patient, never joined
    other = generate_uid()
    assert (
        post_study(client, tokens, [dx_instance(study_uid=other, patient_id="MRN-7", issuer="urn:oid:9.9")]).status_code
        == 200
    )
    # no issuer in the DICOM object: joined only because the value is unique among our identifiers
    bare = generate_uid()
    assert post_study(client, tokens, [dx_instance(study_uid=bare, patient_id="MRN-7", issuer=None)]).status_code == 200
    patients = {
        uid: client.get(f"/v1/studies/{uid}", headers=clinician).json()["patient"] for uid in (first, other, bare)
    }
    assert patients[first] is not None
    assert patients[other] is None
    assert patients[bare] == patients[first]
    # the issuer's own patient arrives later: its waiting study is joined then
    assert (
        client.post("/fhir", json=patient_bundle(patient_id="MRN-7", issuer="urn:oid:9.9"), headers=ingest).status_code
        == 200
    )
    joined = client.get(f"/v1/studies/{other}", headers=clinician).json()["patient"]
    assert joined is not None and joined != patients[first]


def test_chunked_stow_body_is_streamed_and_each_instance_referenced(client: TestClient, tokens: Tokens) -> None:
    study_uid = generate_uid()
    body, content_type = multipart_related([dx_instance(study_uid=study_uid, seed=i, size=256) for i in range(3)])

    def chunks() -> Any:
        for start in range(0, len(body), 7919):  # odd-sized chunks split parts and delimiters anywhere
            yield body[start : start + 7919]

    response = client.post(
        "/dicomweb/studies", content=chunks(), headers={"Content-Type": content_type, **tokens.header("ingest")}
    )
    assert response.status_code == 200, response.text
    referenced = response.json()["00081199"]["Value"]
    assert len(referenced) == 3
    retrieve = client.get(
        referenced[0]["00081190"]["Value"][0].replace("http://testserver", ""), headers=tokens.header("clinician")
    )
    assert retrieve.status_code == 200
    assert retrieve.headers["content-type"].startswith("multipart/related")
    assert b"DICM" in retrieve.content


def test_a_client_can_wait_for_the_report_and_read_where_the_time_went(client: TestClient, tokens: Tokens) -> None:
    study_uid = generate_uid()
    assert post_study(client, tokens, [dx_instance(study_uid=study_uid)]).status_code == 200
    clinician = tokens.header("clinician")
    assert client.get(f"/v1/studies/{study_uid}/report", headers=clinician).status_code == 404
    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=clinician).status_code == 202
    waited = client.get(f"/v1/studies/{study_uid}/report", params={"wait": 60}, headers=clinician)
    assert waited.status_code == 200, "answered as soon as the report was stored"
    [job] = client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["jobs"]
    timings = job["timings"]
    order = ["enqueued_preprocess", "preprocess_started", "enqueued_infer", "infer_started", "store_started"]
    assert [timings[k] for k in order] == sorted(timings[k] for k in order)
    assert timings["report_stored"] >= timings["store_started"]
    assert timings["batch_size"] >= 1 and timings["provider"] == "CPUExecutionProvider"
    assert timings["preprocess_seconds"] > 0 and timings["inference_seconds"] > 0
    outcome = client.get(f"/v1/studies/{study_uid}/report", params={"wait": 500}, headers=clinician)
    assert outcome.status_code == 400, "the wait is bounded"


def test_clients_waiting_for_reports_do_not_hold_up_the_rest_of_the_api(runtime: Runtime, tokens: Tokens) -> None:
    # more waiting clients than the server has threads for synchronous endpoints (40): the waits are on the event
    # loop, so a STOW-RS and a study read sent after them are answered while they still wait
    import asyncio

    import httpx

    from service.api.main import create_app

    study_uid = generate_uid()
    clinician, ingest = tokens.header("clinician"), tokens.header("ingest")
    body, content_type = multipart_related([dx_instance(study_uid=study_uid)])
    app = create_app(runtime, embedded_worker=False)  # no worker: the study's job stays queued, its report unmade

    async def scenario() -> list[str]:
        finished: list[str] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clinfer", timeout=60) as http:
            stored = await http.post(
                "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **ingest}
            )
            assert stored.status_code == 200, stored.text
            assert (await http.post(f"/v1/studies/{study_uid}/analyze", headers=clinician)).status_code == 202

            async def wait_for_report() -> None:
                response = await http.get(f"/v1/studies/{study_uid}/report", params={"wait": 3}, headers=clinician)
                assert response.status_code == 404  # no worker ran: after its wait, no report
                finished.append("wait")

            async def other(method: str, url: str, **kwargs: Any) -> None:
                await asyncio.sleep(0.3)  # once every waiter is waiting
                response = await http.request(method, url, **kwargs)
                assert response.status_code == 200, response.text
                finished.append(url)

            another, other_type = multipart_related([dx_instance(study_uid=generate_uid())])
            await asyncio.gather(
                *(wait_for_report() for _ in range(50)),
                other("POST", "/dicomweb/studies", content=another, headers={"Content-Type": other_type, **ingest}),
                other("GET", f"/v1/studies/{study_uid}", headers=clinician),
            )
        return finished

    finished = asyncio.run(scenario())
    assert sorted(finished[:2]) == ["/dicomweb/studies", f"/v1/studies/{study_uid}"], finished[:4]
    assert finished[2:] == ["wait"] * 50
