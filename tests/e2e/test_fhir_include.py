"""``_include`` and ``_revinclude`` on the FHIR API: an EHR fetches a DiagnosticReport with its result Observations,
its patient and its Provenance in one search, as the HL7 AI transparency guide reaches the model (the Device) from
the report. What they add is read as the matches are: the token must cover each type, a patient-level token sees
its own patient's only, and the audit event names what was added."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.api import auth
from service.flows.runtime import Runtime
from service.store.tables import AuditEvent
from tests.conftest import Tokens
from tests.e2e.test_embedded_spine import post_study, wait_for_report
from tests.factories import dx_instance, patient_bundle


def _reported(client: TestClient, tokens: Tokens, patient_id: str) -> dict[str, Any]:
    """A chest radiograph of the patient with that MRN, and its patient's Bundle: analyzed, its report."""
    bundle = client.post("/fhir", json=patient_bundle(patient_id=patient_id), headers=tokens.header("ingest"))
    assert bundle.status_code == 200, bundle.text
    study_uid = generate_uid()
    assert post_study(client, tokens, [dx_instance(patient_id=patient_id, study_uid=study_uid)]).status_code == 200
    assert client.post(f"/v1/studies/{study_uid}/analyze", headers=tokens.header("clinician")).status_code == 202
    [report] = wait_for_report(client, study_uid, tokens.header("clinician"))["reports"]
    assert report["patient"] is not None
    return dict(report)


def _modes(bundle: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        found.setdefault(entry["search"]["mode"], []).append(f"{resource['resourceType']}/{resource['id']}")
    return found


def test_a_report_with_its_results_patient_and_provenance_in_one_search(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    report = _reported(client, tokens, "MRN-1001")
    clinician = tokens.header("clinician")
    resource = client.get(f"/fhir/DiagnosticReport/{report['id']}", headers=clinician).json()
    results = sorted(r["reference"] for r in resource["result"])
    assert len(results) == len(report["findings"])

    found = client.get(
        "/fhir/DiagnosticReport",
        params=[
            ("_id", report["id"]),
            ("_include", "DiagnosticReport:result"),
            ("_include", "DiagnosticReport:subject"),
            ("_revinclude", "Provenance:target"),
        ],
        headers=clinician,
    )
    assert found.status_code == 200, found.text
    bundle = found.json()
    assert bundle["total"] == 1  # the matches only
    modes = _modes(bundle)
    assert modes["match"] == [f"DiagnosticReport/{report['id']}"]
    included = modes["include"]
    assert sorted(r for r in included if r.startswith("Observation/")) == results
    assert report["patient"] in included
    provenances = [r for r in included if r.startswith("Provenance/")]
    assert len(provenances) == 1, included

    # one hop further: the model, as the Device an Observation names
    observation = client.get(
        "/fhir/Observation",
        params=[("_id", results[0].split("/")[1]), ("_include", "Observation:device")],
        headers=clinician,
    ).json()
    [device] = [r for r in _modes(observation)["include"] if r.startswith("Device/")]
    assert client.get(f"/fhir/{device}", headers=clinician).json()["deviceName"]

    with runtime.sessions() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "fhir.search").order_by(AuditEvent.id.desc())
        ).all()[1]  # the report's search, before the Observation's
    assert sorted(event.detail["included"]) == sorted(included)
    assert event.patient_ref == report["patient"]

    capability = client.get("/fhir/metadata", headers=clinician).json()
    by_type = {r["type"]: r for r in capability["rest"][0]["resource"]}
    assert "DiagnosticReport:result" in by_type["DiagnosticReport"]["searchInclude"]
    assert "Provenance:target" in by_type["DiagnosticReport"]["searchRevInclude"]


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("_include", "Observation:device", "includes from DiagnosticReport"),
        ("_include", "DiagnosticReport:code", "not a reference search parameter"),
        ("_include", "*", "no wildcard"),
        ("_include", "DiagnosticReport:*", "no wildcard"),
        ("_include:iterate", "DiagnosticReport:result", "one level of inclusion only"),
        ("_revinclude", "Provenance:target:Observation", "includes what refers to DiagnosticReport"),
        ("_include", "DiagnosticReport:patient:Device", "refers to Patient only"),
    ],
)
def test_an_include_we_cannot_follow_is_a_400_naming_it(
    client: TestClient, tokens: Tokens, param: str, value: str, message: str
) -> None:
    refused = client.get("/fhir/DiagnosticReport", params={param: value}, headers=tokens.header("clinician"))
    assert refused.status_code == 400, refused.text
    assert refused.json()["resourceType"] == "OperationOutcome" and message in refused.text


def test_a_patient_level_token_includes_its_own_patient_s_resources_only_and_types_it_may_read(
    client: TestClient, tokens: Tokens
) -> None:
    mine = _reported(client, tokens, "MRN-1001")
    theirs = _reported(client, tokens, "MRN-2002")
    token = auth.mint_token(
        tokens.settings,
        role="clinician",
        scopes=("patient/DiagnosticReport.rs", "patient/Observation.rs", "patient/Patient.rs"),
        patient=mine["patient"].split("/")[1],
    )
    headers = {"Authorization": f"Bearer {token}"}
    found = client.get(
        "/fhir/DiagnosticReport",
        params=[("_include", "DiagnosticReport:result"), ("_include", "DiagnosticReport:subject")],
        headers=headers,
    )
    assert found.status_code == 200, found.text
    modes = _modes(found.json())
    assert modes["match"] == [f"DiagnosticReport/{mine['id']}"]
    assert mine["patient"] in modes["include"] and theirs["patient"] not in modes["include"]
    assert len([r for r in modes["include"] if r.startswith("Observation/")]) == len(mine["findings"])
    # the Provenance scope is not in the token: asking to add Provenances is refused, not silently left out
    refused = client.get("/fhir/DiagnosticReport", params={"_revinclude": "Provenance:target"}, headers=headers)
    assert refused.status_code == 403 and "Provenance" in refused.text


def test_each_added_type_is_held_to_the_compartment_of_the_scope_that_covers_it(
    client: TestClient, tokens: Tokens
) -> None:
    """Found in review: a token whose report scope is user/ but whose Patient scope is patient/ (one patient's app
    with a wider report list) got every report's Patient added, although it may read its own Patient only."""
    mine = _reported(client, tokens, "MRN-1001")
    theirs = _reported(client, tokens, "MRN-2002")
    token = auth.mint_token(
        tokens.settings,
        role="clinician",
        scopes=("user/DiagnosticReport.rs", "patient/Patient.rs"),
        patient=mine["patient"].split("/")[1],
    )
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(f"/fhir/{theirs['patient']}", headers=headers).status_code == 404
    found = client.get("/fhir/DiagnosticReport", params={"_include": "DiagnosticReport:subject"}, headers=headers)
    assert found.status_code == 200, found.text
    modes = _modes(found.json())
    assert sorted(modes["match"]) == sorted([f"DiagnosticReport/{mine['id']}", f"DiagnosticReport/{theirs['id']}"])
    assert modes["include"] == [mine["patient"]]
    untyped = client.get("/fhir/DiagnosticReport", params={"_include": "DiagnosticReport:patient"}, headers=headers)
    assert _modes(untyped.json())["include"] == [mine["patient"]]
