"""The FHIR R4 server on the embedded default: Bundle semantics, REST with versions and conditions, search with
paging, errors as valid OperationOutcomes, AI-read orders, and what each caller may see."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from pydicom.uid import generate_uid

from service.api import auth
from service.api.main import create_app
from service.flows.runtime import build_runtime, set_runtime
from service.results.fhir import validate_resource
from tests.conftest import Tokens, make_settings
from tests.e2e.test_embedded_spine import post_study, wait_for_report
from tests.factories import dx_instance, multipart_related, patient_bundle

FHIR = "application/fhir+json"


def outcome_of(response: Response, status: int) -> dict[str, Any]:
    """The response is an error with ``status`` whose body is a valid R4 OperationOutcome."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    validate_resource(body)
    return body


def created_id(response: Response) -> str:
    """The id of the resource a write answered for, from its Location (an ingest token gets no body back)."""
    assert response.status_code in (200, 201), response.text
    return str(response.headers["location"].split("/_history/")[0].rsplit("/", 1)[1])


def patient(identifier: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": identifier}],
        "gender": "female",
        "birthDate": "1958-03-01",
    }


def crp(patient_ref: str, value: float, *, status: str = "final", when: str = "2026-11-20T08:00:00Z") -> dict:
    return {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "1988-5"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"},
    }


def test_a_transaction_with_one_invalid_entry_changes_nothing(client: TestClient, tokens: Tokens) -> None:
    ingest = tokens.header("ingest")
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    bad = crp(patient_url, 5.0)
    bad["status"] = "not-a-status"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": patient_url, "resource": patient("TX-1"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": crp(patient_url, 4.0), "request": {"method": "POST", "url": "Observation"}},
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    body = outcome_of(client.post("/fhir", json=bundle, headers=ingest), 400)
    assert "entry[2]" in body["issue"][0]["diagnostics"]
    assert body["issue"][0].get("expression") == ["Bundle.entry[2]"]
    clinician = tokens.header("clinician")
    found = client.get("/fhir/Patient", params={"identifier": "urn:oid:1.2.3.4.5|TX-1"}, headers=clinician).json()
    assert found["total"] == 0, "nothing of the transaction was stored"


def test_a_batch_stores_the_valid_entries_and_reports_the_invalid_one(client: TestClient, tokens: Tokens) -> None:
    ingest = tokens.header("ingest")
    created = client.post("/fhir/Patient", json=patient("B-1"), headers=ingest)
    assert created.status_code == 201, created.text
    patient_ref = f"Patient/{created_id(created)}"
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": crp(patient_ref, 4.0), "request": {"method": "POST", "url": "Observation"}},
            {"resource": crp("Patient/nobody", 5.0), "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    response = client.post("/fhir", json=bundle, headers=ingest)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    first, unresolved, invalid = (e["response"] for e in result["entry"])
    assert first["status"] == "201 Created" and first["location"].startswith("Observation/")
    assert first["etag"] == 'W/"1"'
    assert (
        unresolved["status"].startswith("422") and "Patient/nobody" in unresolved["outcome"]["issue"][0]["diagnostics"]
    )
    assert invalid["status"].startswith("400")
    for entry in (unresolved, invalid):
        validate_resource(entry["outcome"])
    stored = client.get("/fhir/Observation", params={"subject": patient_ref}, headers=tokens.header("clinician")).json()
    assert stored["total"] == 1


def test_conditional_create_and_update_on_identifiers(client: TestClient, tokens: Tokens) -> None:
    ingest = tokens.header("ingest")
    query = "identifier=urn:oid:1.2.3.4.5|C-1"
    first = client.post("/fhir/Patient", json=patient("C-1"), headers={**ingest, "If-None-Exist": query})
    second = client.post("/fhir/Patient", json=patient("C-1"), headers={**ingest, "If-None-Exist": query})
    assert (first.status_code, second.status_code) == (201, 200)
    assert created_id(first) == created_id(second)
    updated = patient("C-1") | {"gender": "male"}
    put = client.put(f"/fhir/Patient?{query}", json=updated, headers=ingest)
    assert put.status_code == 200, put.text
    assert created_id(put) == created_id(first) and put.headers["etag"] == 'W/"2"'
    stored = client.get(f"/fhir/Patient/{created_id(first)}", headers=tokens.header("clinician")).json()
    assert stored["gender"] == "male"
    created = client.put("/fhir/Patient?identifier=urn:oid:1.2.3.4.5|C-2", json=patient("C-2"), headers=ingest)
    assert created.status_code == 201
    # the urn:uuid of a conditional create that matched points at the existing resource
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_url,
                "resource": patient("C-1"),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": query},
            },
            {"resource": crp(patient_url, 7.0), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    response = client.post("/fhir", json=bundle, headers=ingest).json()
    assert response["entry"][0]["response"]["status"] == "200 OK"
    location = response["entry"][1]["response"]["location"]
    observation_body = client.get(f"/fhir/{location.split('/_history')[0]}", headers=tokens.header("clinician")).json()
    assert observation_body["subject"]["reference"] == f"Patient/{created_id(first)}"


def test_a_condition_is_about_which_resources_match_not_how_a_page_of_them_is_shown(
    client: TestClient, tokens: Tokens
) -> None:
    """Before, a condition was run as a search's first page: with ``_count=0`` it matched nothing (a duplicate
    created every time), with ``_count=1`` or ``_offset`` it hid a second match (one of two updated at random,
    where a client must get 412), and a condition with no criteria at all matched whatever came first."""
    ingest = tokens.header("ingest")
    patient_ref = "Patient/" + created_id(client.post("/fhir/Patient", json=patient("P-1"), headers=ingest))
    measured = crp(patient_ref, 5.0) | {"identifier": [{"system": "urn:lab", "value": "crp-1"}]}
    query = "identifier=urn:lab|crp-1"
    first = client.post("/fhir/Observation", json=measured, headers={**ingest, "If-None-Exist": query})
    assert first.status_code == 201, first.text
    for paged in (f"{query}&_count=0", f"_summary=count&{query}", f"{query}&_offset=1"):
        again = client.post("/fhir/Observation", json=measured, headers={**ingest, "If-None-Exist": paged})
        assert again.status_code == 200 and created_id(again) == created_id(first), (paged, again.text)
    # a second Observation with the same identifier (not conditional): the condition now matches two
    assert client.post("/fhir/Observation", json=measured, headers=ingest).status_code == 201
    for paged in (f"{query}&_count=1", f"{query}&_sort=-_lastUpdated&_count=1"):
        put = client.put(f"/fhir/Observation?{paged}", json=crp(patient_ref, 50.0), headers=ingest)
        assert put.status_code == 412, (paged, put.text)
        assert put.json()["resourceType"] == "OperationOutcome"
    for bare in ("_count=1", "_sort=_id"):
        refused = client.post("/fhir/Observation", json=measured, headers={**ingest, "If-None-Exist": bare})
        assert refused.status_code == 400 and "no search criteria" in refused.text, (bare, refused.text)
    found = client.get("/fhir/Observation", params={"identifier": "urn:lab|crp-1"}, headers=tokens.header("clinician"))
    assert found.json()["total"] == 2
    assert [e["resource"]["valueQuantity"]["value"] for e in found.json()["entry"]] == [5.0, 5.0]


def test_rest_versions_if_match_delete_and_gone(client: TestClient, tokens: Tokens) -> None:
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    patient_id = created_id(client.post("/fhir/Patient", json=patient("R-1"), headers=ingest))
    created = client.post("/fhir/Observation", json=crp(f"Patient/{patient_id}", 3.0), headers=ingest)
    observation_id = created_id(created)
    assert created.headers["location"].endswith(f"/fhir/Observation/{observation_id}/_history/1")
    changed = crp(f"Patient/{patient_id}", 30.0) | {"id": observation_id, "status": "amended"}
    ok = client.put(f"/fhir/Observation/{observation_id}", json=changed, headers={**ingest, "If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"2"'
    stale = client.put(f"/fhir/Observation/{observation_id}", json=changed, headers={**ingest, "If-Match": 'W/"1"'})
    outcome_of(stale, 412)
    first = client.get(f"/fhir/Observation/{observation_id}/_history/1", headers=clinician).json()
    assert first["valueQuantity"]["value"] == 3.0 and first["meta"]["versionId"] == "1"
    history = client.get(f"/fhir/Observation/{observation_id}/_history", headers=clinician).json()
    assert [e["response"]["etag"] for e in history["entry"]] == ['W/"2"', 'W/"1"']
    assert client.delete(f"/fhir/Observation/{observation_id}", headers=ingest).status_code == 204
    outcome_of(client.get(f"/fhir/Observation/{observation_id}", headers=clinician), 410)
    outcome_of(client.get("/fhir/Observation/never-was", headers=clinician), 404)
    outcome_of(client.get(f"/fhir/Observation/{observation_id}", headers=ingest), 403)


def test_search_parameters_and_paging_links(client: TestClient, tokens: Tokens) -> None:
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    patient_id = created_id(client.post("/fhir/Patient", json=patient("S-1"), headers=ingest))
    for day in range(1, 8):
        body = crp(f"Patient/{patient_id}", float(day), when=f"2026-11-{day:02d}T08:00:00Z")
        assert client.post("/fhir/Observation", json=body, headers=ingest).status_code == 201
    params = {"patient": patient_id, "code": "http://loinc.org|1988-5", "date": "ge2026-11-03", "_count": "2"}
    page = client.get("/fhir/Observation", params=params, headers=clinician).json()
    assert page["total"] == 5 and len(page["entry"]) == 2
    seen = [e["resource"]["id"] for e in page["entry"]]
    while (next_url := next((link["url"] for link in page["link"] if link["relation"] == "next"), None)) is not None:
        page = client.get("/fhir" + next_url.split("/fhir", 1)[1], headers=clinician).json()
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
    assert len(seen) == len(set(seen)) == 5
    recent = client.get(
        "/fhir/Observation", params={"_lastUpdated": "gt2020-01-01", "patient": patient_id}, headers=clinician
    )
    assert recent.json()["total"] == 7
    outcome_of(client.get("/fhir/Observation", params={"colour": "red"}, headers=clinician), 400)
    outcome_of(client.get("/fhir/Observation", params={"date": "last tuesday"}, headers=clinician), 400)


def test_errors_are_operation_outcomes_with_fhir_status_codes(client: TestClient, tokens: Tokens) -> None:
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    outcome_of(client.get("/fhir/Spaceship/1", headers=clinician), 404)
    outcome_of(client.post("/fhir/DiagnosticReport", json={"resourceType": "DiagnosticReport"}, headers=ingest), 405)
    outcome_of(client.post("/fhir/Observation", content=b"{not json", headers={**ingest, "Content-Type": FHIR}), 400)
    outcome_of(client.post("/fhir/Observation", json=crp("Patient/nobody", 1.0), headers=ingest), 422)
    outcome_of(client.get("/fhir/AuditEvent", headers=clinician), 403)
    outcome_of(client.get("/fhir/Observation", headers={"Authorization": "Bearer nope"}), 401)
    # R5-only content is refused with a message that says so
    r5 = {
        "resourceType": "MedicationStatement",
        "status": "recorded",
        "medication": {"concept": {"text": "aspirin"}},
        "subject": {"reference": "Patient/x"},
    }
    body = outcome_of(client.post("/fhir/MedicationStatement", json=r5, headers=ingest), 400)
    assert "R5" in body["issue"][0]["diagnostics"] and "R4" in body["issue"][0]["diagnostics"]
    versioned = client.post(
        "/fhir/Patient", json=patient("V-1"), headers={**ingest, "Content-Type": f"{FHIR}; fhirVersion=5.0"}
    )
    outcome_of(versioned, 400)


def test_capability_statement_lists_what_is_served(client: TestClient, tokens: Tokens) -> None:
    statement = client.get("/fhir/metadata", headers=tokens.header("clinician")).json()
    validate_resource(statement)
    assert statement["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Condition", "MedicationStatement", "ImagingStudy", "ServiceRequest"} <= set(
        resources
    )
    assert {"DiagnosticReport", "Provenance", "Device", "AuditEvent"} <= set(resources)
    assert {i["code"] for i in resources["Observation"]["interaction"]} >= {
        "read",
        "vread",
        "create",
        "update",
        "delete",
        "search-type",
    }
    assert "create" not in {i["code"] for i in resources["DiagnosticReport"]["interaction"]}
    assert {"patient", "code", "date", "_lastUpdated"} <= {p["name"] for p in resources["Observation"]["searchParam"]}


def test_a_patient_level_token_sees_only_its_patient(client: TestClient, tokens: Tokens) -> None:
    ingest = tokens.header("ingest")
    mine = created_id(client.post("/fhir/Patient", json=patient("P-MINE"), headers=ingest))
    other = created_id(client.post("/fhir/Patient", json=patient("P-OTHER"), headers=ingest))
    for patient_id in (mine, other):
        client.post("/fhir/Observation", json=crp(f"Patient/{patient_id}", 2.0), headers=ingest)
    token = auth.mint_token(
        tokens.settings, role="clinician", scopes=("patient/Observation.rs", "patient/Patient.rs"), patient=mine
    )
    headers = {"Authorization": f"Bearer {token}"}
    found = client.get("/fhir/Observation", params={"code": "1988-5"}, headers=headers).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{mine}"
    outcome_of(client.get(f"/fhir/Patient/{other}", headers=headers), 404)
    assert client.get(f"/fhir/Patient/{mine}", headers=headers).status_code == 200
    outcome_of(client.get("/fhir/Condition", headers=headers), 403)


def test_a_patient_level_token_is_refused_where_nothing_narrows_to_its_patient(
    client: TestClient, tokens: Tokens
) -> None:
    """Found in review: /v1 and DICOMweb counted patient/ scopes as user/ ones, and return every patient's studies,
    so a token for one patient listed all of them (with their PatientIDs and positive findings) there. Those routes
    now take user/ or system/ scopes only; the FHIR API, which narrows to the token's patient, still takes it."""
    ingest = tokens.header("ingest")
    mine = created_id(client.post("/fhir/Patient", json=patient("P-MINE"), headers=ingest))
    body, content_type = multipart_related([dx_instance(patient_id="OTHER-9")])
    stowed = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type, **ingest})
    assert stowed.status_code == 200
    token = auth.mint_token(
        tokens.settings,
        role="clinician",
        scopes=("patient/ImagingStudy.rs", "patient/DiagnosticReport.rs", "patient/Patient.rs"),
        patient=mine,
    )
    headers = {"Authorization": f"Bearer {token}"}
    for path in ("/v1/studies", "/dicomweb/studies"):
        refused = client.get(path, headers=headers)
        assert refused.status_code == 403 and "patient/ scopes" in refused.text, (path, refused.text)
    assert client.get("/fhir/ImagingStudy", headers=headers).json()["total"] == 0
    # a wide study scope with a patient-level report scope: the study list, without the reports' findings
    mixed = auth.mint_token(
        tokens.settings, role="clinician", scopes=("user/ImagingStudy.rs", "patient/DiagnosticReport.rs"), patient=mine
    )
    listed = client.get("/v1/studies", headers={"Authorization": f"Bearer {mixed}"}).json()["studies"]
    assert [s["dicom_patient_id"] for s in listed] == ["OTHER-9"] and listed[0]["reports"] is None


@pytest.mark.parametrize(("order_priority", "job_priority"), [(None, "routine"), ("stat", "stat")])
def test_an_order_triggers_the_analysis_and_the_report_is_based_on_it(
    tmp_path: Path, order_priority: str | None, job_priority: str
) -> None:
    """The order's priority counts: an AI read ordered stat (asap, urgent) is queued as STAT (found in review: it
    was ignored, and the read waited in the routine queue)."""
    settings = make_settings(tmp_path, study_stable_seconds=0.5, analyze_unordered=False)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    ingest, clinician = tokens.header("ingest"), tokens.header("clinician")
    with TestClient(create_app(runtime)) as client:
        assert client.post("/fhir", json=patient_bundle(), headers=ingest).status_code == 200
        study_uid = generate_uid()
        part = dx_instance(study_uid=study_uid)
        assert post_study(client, tokens, [part]).status_code == 200
        time.sleep(2.0)
        assert client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["jobs"] == [], "no order yet"
        accession = client.get(f"/dicomweb/studies?StudyInstanceUID={study_uid}", headers=clinician).json()[0][
            "00080050"
        ]["Value"][0]
        patients = client.get("/fhir/Patient", params={"identifier": "MRN-1001"}, headers=clinician).json()
        order = {
            "resourceType": "ServiceRequest",
            "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}], "text": "AI read"},
            "subject": {"reference": f"Patient/{patients['entry'][0]['resource']['id']}"},
            "identifier": [
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": accession,
                }
            ],
        }
        if order_priority:
            order["priority"] = order_priority
        created = client.post("/fhir/ServiceRequest", json=order, headers=ingest)
        assert created.status_code == 201, created.text
        report = wait_for_report(client, study_uid, clinician)["reports"][0]
        [job] = client.get(f"/v1/studies/{study_uid}", headers=clinician).json()["jobs"]
        assert job["priority"] == job_priority
        resource = client.get(f"/fhir/DiagnosticReport/{report['id']}", headers=clinician).json()
        validate_resource(resource)
        assert resource["basedOn"] == [{"reference": f"ServiceRequest/{created_id(created)}"}]
        found = client.get(
            "/fhir/DiagnosticReport", params={"based-on": f"ServiceRequest/{created_id(created)}"}, headers=clinician
        )
        assert found.json()["total"] == 1
        provenance = client.get(
            "/fhir/Provenance", params={"target": f"DiagnosticReport/{report['id']}"}, headers=clinician
        ).json()
        assert provenance["total"] == 1
        agents = [a["who"]["reference"] for a in provenance["entry"][0]["resource"]["agent"]]
        device = client.get(f"/fhir/{agents[0]}", headers=clinician)
        assert device.status_code == 200 and device.json()["resourceType"] == "Device"


def test_a_patient_level_token_cannot_read_the_audit_trail(client: TestClient, tokens: Tokens) -> None:
    """Found in review: AuditEvent search and read counted patient/ scopes, and nothing narrowed the trail to the
    token's patient, so a token with ``patient/*.rs`` for one patient read every patient's audit events. The trail
    is a security officer's record: it takes user/ or system/ scopes only, and says so."""
    ingest, admin = tokens.header("ingest"), tokens.header("admin")
    mine = created_id(client.post("/fhir/Patient", json=patient("AE-MINE"), headers=ingest))
    other = created_id(client.post("/fhir/Patient", json=patient("AE-OTHER"), headers=ingest))
    others = client.get("/fhir/AuditEvent", params={"patient": f"Patient/{other}"}, headers=admin).json()
    event_id = others["entry"][0]["resource"]["id"]  # the trail holds the other patient's events
    for scopes in (("patient/*.rs",), ("patient/AuditEvent.rs", "patient/Patient.rs")):
        token = auth.mint_token(tokens.settings, role="clinician", scopes=scopes, patient=mine)
        headers = {"Authorization": f"Bearer {token}"}
        for path, params in [
            ("/fhir/AuditEvent", {}),
            ("/fhir/AuditEvent", {"patient": f"Patient/{other}"}),
            ("/fhir/AuditEvent", {"patient": f"Patient/{mine}"}),
            (f"/fhir/AuditEvent/{event_id}", {}),
        ]:
            body = outcome_of(client.get(path, params=params, headers=headers), 403)
            diagnostics = body["issue"][0]["diagnostics"]
            assert "user/ or system/AuditEvent" in diagnostics and "audit trail" in diagnostics, diagnostics
        assert client.get(f"/fhir/Patient/{mine}", headers=headers).status_code == 200, "its own patient still"
    assert client.get(f"/fhir/AuditEvent/{event_id}", headers=admin).status_code == 200


def test_a_writer_that_may_not_read_gets_no_resource_back(client: TestClient, tokens: Tokens) -> None:
    """Found in review: a conditional create that matched answered with the stored resource, so an ingest token
    (which may not read) read any Patient (name, birth date, MRN) or another patient's Observation by guessing
    criteria. A write's answer carries the resource only for a principal that may read it (within its patient
    compartment); for others it is what ``Prefer: return=minimal`` gives: status, Location, ETag, Last-Modified."""
    ingest = tokens.header("ingest")
    doe = patient("MRN-DOE-7") | {"name": [{"family": "Doe", "given": ["Jane"]}], "birthDate": "1961-07-14"}
    doe_id = created_id(client.post("/fhir/Patient", json=doe, headers=ingest))
    secret = crp(f"Patient/{doe_id}", 123.4) | {"note": [{"text": "confidential-remark"}]}
    observation_id = created_id(client.post("/fhir/Observation", json=secret, headers=ingest))
    hidden = ("Doe", "Jane", "MRN-DOE-7", "1961-07-14", "123.4", "confidential-remark")

    def shows_nothing(response: Response, status: int, location: str, version: int = 1) -> None:
        assert response.status_code == status, response.text
        assert response.content == b"" and not any(s in response.text for s in hidden), response.text
        assert response.headers["location"].endswith(f"/fhir/{location}/_history/{version}")
        assert response.headers["etag"] == f'W/"{version}"' and response.headers["last-modified"]

    probe = {"resourceType": "Patient"}
    matched = client.post("/fhir/Patient", json=probe, headers={**ingest, "If-None-Exist": "family=Doe"})
    shows_nothing(matched, 200, f"Patient/{doe_id}")
    condition = f"subject=Patient/{doe_id}&code=http://loinc.org|1988-5"
    guessed = client.post(
        "/fhir/Observation", json=crp(f"Patient/{doe_id}", 0.0), headers={**ingest, "If-None-Exist": condition}
    )
    shows_nothing(guessed, 200, f"Observation/{observation_id}")
    new = client.post("/fhir/Patient", json=patient("MRN-NEW-8"), headers=ingest)
    assert new.status_code == 201 and new.content == b"" and new.headers["location"]
    updated = client.put("/fhir/Patient?identifier=urn:oid:1.2.3.4.5|MRN-DOE-7", json=doe, headers=ingest)
    shows_nothing(updated, 200, f"Patient/{doe_id}", version=2)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": probe, "request": {"method": "POST", "url": "Patient", "ifNoneExist": "family=Doe"}}],
    }
    answered = client.post("/fhir", json=bundle, headers=ingest)
    assert answered.status_code == 200 and not any(s in answered.text for s in hidden), answered.text
    [entry] = answered.json()["entry"]
    assert entry == {"response": entry["response"]} and entry["response"]["status"] == "200 OK"
    assert entry["response"]["location"] == f"Patient/{doe_id}/_history/2"

    # a principal that may write and read the type gets the resource back, as before
    reader = auth.mint_token(tokens.settings, role="ingest", scopes=("system/Patient.cruds",))
    shown = client.post(
        "/fhir/Patient", json=probe, headers={"Authorization": f"Bearer {reader}", "If-None-Exist": "family=Doe"}
    )
    assert shown.status_code == 200 and shown.json()["name"][0]["family"] == "Doe", shown.text
    # a patient/ read scope: its own patient's resource, and no other's
    other_id = created_id(client.post("/fhir/Patient", json=patient("MRN-OTHER-9"), headers=ingest))
    own = auth.mint_token(
        tokens.settings, role="ingest", scopes=("system/Patient.c", "patient/Patient.r"), patient=doe_id
    )
    own_headers = {"Authorization": f"Bearer {own}"}
    mine = client.post("/fhir/Patient", json=probe, headers={**own_headers, "If-None-Exist": "family=Doe"})
    assert mine.status_code == 200 and mine.json()["id"] == doe_id, mine.text
    theirs = client.post(
        "/fhir/Patient",
        json=probe,
        headers={**own_headers, "If-None-Exist": "identifier=urn:oid:1.2.3.4.5|MRN-OTHER-9"},
    )
    assert theirs.status_code == 200 and theirs.content == b"", theirs.text
    assert theirs.headers["location"].endswith(f"/fhir/Patient/{other_id}/_history/1")


def test_a_patient_level_token_does_not_write(client: TestClient, tokens: Tokens) -> None:
    """Found in review: writes counted patient/ scopes and nothing held them to the token's patient, so a patient's
    app with patient/Observation.c could write an Observation into any patient's record. Writes take user/ or
    system/ scopes only, by REST and in Bundles."""
    ingest = tokens.header("ingest")
    mine = created_id(client.post("/fhir/Patient", json=patient("P-MINE"), headers=ingest))
    other = created_id(client.post("/fhir/Patient", json=patient("P-OTHER"), headers=ingest))
    token = auth.mint_token(
        tokens.settings,
        role="clinician",
        scopes=("patient/Observation.cruds", "patient/Patient.rs"),
        patient=mine,
    )
    headers = {"Authorization": f"Bearer {token}"}
    for target in (mine, other):
        refused = client.post("/fhir/Observation", json=crp(f"Patient/{target}", 5.0), headers=headers)
        assert refused.status_code == 403 and "patient/ scopes do not write" in refused.text, refused.text
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": crp(f"Patient/{other}", 5.0), "request": {"method": "POST", "url": "Observation"}}],
    }
    assert client.post("/fhir", json=bundle, headers=headers).status_code == 403
    searched = client.get(
        "/fhir/Observation", params={"subject": f"Patient/{other}"}, headers=tokens.header("clinician")
    )
    assert searched.json()["total"] == 0, "nothing was written"
    # reading stays within the compartment
    assert client.get("/fhir/Observation", headers=headers).status_code == 200


def test_a_patient_level_token_does_not_delete(client: TestClient, tokens: Tokens) -> None:
    """Found in review: REST DELETE still counted patient/ scopes after writes stopped doing so, so a patient's app
    could delete another patient's Observations (the lab values the models read)."""
    ingest = tokens.header("ingest")
    mine = created_id(client.post("/fhir/Patient", json=patient("P-MINE"), headers=ingest))
    other = created_id(client.post("/fhir/Patient", json=patient("P-OTHER"), headers=ingest))
    theirs = created_id(client.post("/fhir/Observation", json=crp(f"Patient/{other}", 5.0), headers=ingest))
    token = auth.mint_token(tokens.settings, role="clinician", scopes=("patient/Observation.cruds",), patient=mine)
    refused = client.delete(f"/fhir/Observation/{theirs}", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 403 and "patient/ scopes do not write" in refused.text, refused.text
    assert client.get(f"/fhir/Observation/{theirs}", headers=tokens.header("clinician")).status_code == 200
