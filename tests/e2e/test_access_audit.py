"""Every read that discloses a patient's data is audited with that patient: searches of studies (QIDO-RS and
/v1/studies) and of jobs, a job read, and a read of the audit trail itself; and so is a read refused because
the resource is another patient's."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.api import auth
from service.flows.runtime import Runtime
from service.store.tables import AuditEvent
from tests.conftest import Tokens
from tests.factories import dx_instance, multipart_related, patient_bundle


def _last(runtime: Runtime, event_type: str) -> AuditEvent:
    with runtime.sessions() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == event_type).order_by(AuditEvent.id.desc())
        ).first()
        assert event is not None, f"no {event_type} event"
        session.expunge(event)
        return event


def _store(client: TestClient, tokens: Tokens, part: bytes) -> None:
    body, content_type = multipart_related([part])
    stored = client.post(
        "/dicomweb/studies", content=body, headers={"Content-Type": content_type, **tokens.header("ingest")}
    )
    assert stored.status_code == 200, stored.text


def test_searches_and_reads_name_the_patients_they_disclose(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    """Before, a QIDO-RS search, GET /v1/studies and the job reads recorded no patient: an audit query by patient
    missed every one of these accesses."""
    assert client.post("/fhir", json=patient_bundle(patient_id="MRN-8008"), headers=tokens.header("ingest")).is_success
    linked, unlinked = generate_uid(), generate_uid()
    _store(client, tokens, dx_instance(study_uid=linked, patient_id="MRN-8008", size=256))
    _store(client, tokens, dx_instance(study_uid=unlinked, patient_id="MRN-UNKNOWN", issuer=None, size=64))
    patients = client.get("/fhir/Patient", params={"identifier": "MRN-8008"}, headers=tokens.header("clinician"))
    patient = f"Patient/{patients.json()['entry'][0]['resource']['id']}"
    clinician, admin = tokens.header("clinician"), tokens.header("admin")

    assert client.get("/dicomweb/studies", params={"StudyInstanceUID": linked}, headers=clinician).status_code == 200
    one = _last(runtime, "dicom.search")
    assert one.patient_ref == patient and one.detail["patients"] == [patient]
    assert client.get("/dicomweb/studies", headers=clinician).status_code == 200
    both = _last(runtime, "dicom.search")
    assert both.patient_ref is None  # two people
    assert both.detail["patients"] == [patient] and both.detail["dicom_patient_ids"] == ["MRN-UNKNOWN"]
    assert client.get(f"/dicomweb/studies/{linked}/series", headers=clinician).status_code == 200
    assert _last(runtime, "dicom.search").patient_ref == patient

    assert client.get("/v1/studies", headers=clinician).status_code == 200
    listed = _last(runtime, "study.search")
    assert listed.detail["patients"] == [patient] and listed.detail["dicom_patient_ids"] == ["MRN-UNKNOWN"]

    analyze = client.post(f"/v1/studies/{linked}/analyze", headers=clinician)
    job_id: Any = analyze.json()["jobs"][0]["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=admin).status_code == 200
    read = _last(runtime, "job.read")
    assert (read.entity_ref, read.patient_ref) == (f"job:{job_id}", patient)
    assert client.get("/v1/jobs", headers=admin).status_code == 200
    assert _last(runtime, "job.search").detail["patients"] == [patient]

    event_id = _last(runtime, "job.read").id
    seen = client.get(f"/fhir/AuditEvent/{event_id}", headers=admin)
    assert seen.status_code == 200
    audit_read = _last(runtime, "auditevent.read")
    assert (audit_read.entity_ref, audit_read.patient_ref) == (f"AuditEvent/{event_id}", patient)


def test_a_read_refused_outside_the_token_s_patient_is_a_404_and_an_audited_denial(
    client: TestClient, tokens: Tokens, runtime: Runtime
) -> None:
    """Found in review: a patient-level token's read, vread or history of another patient's resource was answered
    404 with no audit event (the refusal was raised inside the read's transaction, which rolled back). It is still
    a 404 like that of a resource never stored (existence is not confirmed), and now an ``access.denied`` event
    naming the principal, the resource and its patient."""
    ingest = tokens.header("ingest")
    mine, other = (
        client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=ingest).headers["location"]
        for _ in range(2)
    )
    mine_id, other_id = (location.split("/_history/")[0].rsplit("/", 1)[1] for location in (mine, other))
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "1988-5"}]},
        "subject": {"reference": f"Patient/{other_id}"},
        "valueQuantity": {"value": 4.0, "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"},
    }
    created = client.post("/fhir/Observation", json=observation, headers=ingest)
    observation_id = created.headers["location"].split("/_history/")[0].rsplit("/", 1)[1]
    token = auth.mint_token(
        tokens.settings,
        role="clinician",
        subject="patient-app-7",
        scopes=("patient/Patient.rs", "patient/Observation.rs"),
        patient=mine_id,
    )
    headers = {"Authorization": f"Bearer {token}"}
    never = client.get("/fhir/Patient/never-stored", headers=headers)
    assert never.status_code == 404
    for path, resource in [
        (f"/fhir/Patient/{other_id}", f"Patient/{other_id}"),
        (f"/fhir/Patient/{other_id}/_history", f"Patient/{other_id}"),
        (f"/fhir/Patient/{other_id}/_history/1", f"Patient/{other_id}"),
        (f"/fhir/Observation/{observation_id}", f"Observation/{observation_id}"),
    ]:
        refused = client.get(path, headers=headers)
        assert refused.status_code == 404, refused.text
        assert refused.json()["issue"][0]["diagnostics"] == f"{resource} is not known"  # as for one never stored
        assert refused.json()["issue"][0]["code"] == never.json()["issue"][0]["code"]
        denied = _last(runtime, "access.denied")
        assert (denied.actor, denied.outcome, denied.action) == ("patient-app-7", "4", "E")
        assert (denied.entity_type, denied.entity_ref) == (resource.split("/")[0], resource)
        assert denied.patient_ref == f"Patient/{other_id}" and denied.detail["path"] == path
    with runtime.sessions() as session:
        denials = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "access.denied")).all()
        reads = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "fhir.read")).all()
    assert len(denials) == 4, "one for each refused read; none for a resource never stored"
    assert reads == [], "nothing of the other patient was read"
    assert client.get(f"/fhir/Patient/{mine_id}", headers=headers).status_code == 200
    assert _last(runtime, "fhir.read").patient_ref == f"Patient/{mine_id}"
