"""AI-read orders on the embedded default with ``CLINFER_ANALYZE_UNORDERED=false``: only a study linked to an order
in force (active or completed) is analyzed. An order is linked by an ACSN-typed identifier to studies of its own
patient, with the same rule whichever arrives first; revoking or deleting it unlinks the studies not analyzed yet."""

from __future__ import annotations

import datetime as dt
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from service.api.main import create_app
from service.flows import fhir, ingest
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import clinical, fhir_store, studies
from service.store.tables import utcnow
from tests.conftest import Tokens, make_settings
from tests.e2e.test_fhir_server import created_id, post_study, wait_for_report
from tests.factories import dx_instance, patient_bundle

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


@dataclass
class Service:
    client: TestClient
    runtime: Runtime
    tokens: Tokens

    @property
    def ingest(self) -> dict[str, str]:
        return self.tokens.header("ingest")

    @property
    def clinician(self) -> dict[str, str]:
        return self.tokens.header("clinician")

    def patient_ref(self, mrn: str) -> str:
        found = self.client.get("/fhir/Patient", params={"identifier": mrn}, headers=self.clinician).json()
        return f"Patient/{found['entry'][0]['resource']['id']}"

    def store(self, accession: str, **instance: Any) -> str:
        """Store a one-instance study with this AccessionNumber; returns its Study Instance UID."""
        study_uid = generate_uid()
        part = _with_accession(dx_instance(study_uid=study_uid, **instance), accession)
        assert post_study(self.client, self.tokens, [part]).status_code == 200
        return study_uid

    def order(self, body: dict[str, Any]) -> str:
        return created_id(self.client.post("/fhir/ServiceRequest", json=body, headers=self.ingest))

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        response = self.client.get(f"/v1/studies/{study_uid}", headers=self.clinician)
        assert response.status_code == 200, response.text
        return list(response.json()["jobs"])

    def linked_order(self, study_uid: str) -> str | None:
        with self.runtime.sessions() as session:
            return studies.get_or_raise(session=session, study_instance_uid=study_uid).order_resource_id


@contextmanager
def ordered_only(tmp_path: Path) -> Iterator[Service]:
    """The embedded service analyzing only ordered studies, a study due after 1 s of quiet; MRN-1001 is known."""
    settings = make_settings(tmp_path, study_stable_seconds=1, completeness_scan_seconds=0.2, analyze_unordered=False)
    runtime = build_runtime(settings)
    set_runtime(runtime)
    tokens = Tokens(settings)
    with TestClient(create_app(runtime)) as client:
        assert client.post("/fhir", json=patient_bundle(), headers=tokens.header("ingest")).status_code == 200
        yield Service(client, runtime, tokens)


def _with_accession(part: bytes, accession: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(part))
    ds.AccessionNumber = accession
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _accession() -> str:
    return "A" + uuid.uuid4().hex[:10]  # AccessionNumber is SH: 16 characters at most


def _order(patient_ref: str, value: str, *, status: str = "active", id_type: str = "ACSN") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "status": status,
        "intent": "order",
        "code": {"text": "AI read"},
        "subject": {"reference": patient_ref},
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": id_type}]}, "value": value}],
    }


def test_an_order_revoked_or_deleted_before_the_study_is_analyzed_triggers_nothing(tmp_path: Path) -> None:
    """Before, a ServiceRequest revoked (or deleted) after its study had been linked left the link in place: the
    study was analyzed and reported all the same. A report already made stays, with its basedOn."""
    with ordered_only(tmp_path) as service:
        mrn = service.patient_ref("MRN-1001")
        revoked_acc, deleted_acc, reported_acc = _accession(), _accession(), _accession()
        revoked_id = service.order(_order(mrn, revoked_acc))
        deleted_id = service.order(_order(mrn, deleted_acc))
        revoked_study, deleted_study = service.store(revoked_acc), service.store(deleted_acc)
        assert service.linked_order(revoked_study) == revoked_id
        assert service.linked_order(deleted_study) == deleted_id
        # withdrawn before the study has been quiet for 1 s
        revoked = {**_order(mrn, revoked_acc, status="revoked"), "id": revoked_id}
        assert service.client.put(f"/fhir/ServiceRequest/{revoked_id}", json=revoked, headers=service.ingest).is_success
        assert service.client.delete(f"/fhir/ServiceRequest/{deleted_id}", headers=service.ingest).status_code == 204

        # stored after the two above: once it is reported, the sweeper has passed them by
        reported_id = service.order(_order(mrn, reported_acc))
        reported_study = service.store(reported_acc)
        report = wait_for_report(service.client, reported_study, service.clinician)["reports"][0]
        assert service.jobs(revoked_study) == []
        assert service.jobs(deleted_study) == []
        assert service.linked_order(revoked_study) is None
        assert service.linked_order(deleted_study) is None

        # revoked after its report: the report and its link stay
        later = {**_order(mrn, reported_acc, status="revoked"), "id": reported_id}
        assert service.client.put(f"/fhir/ServiceRequest/{reported_id}", json=later, headers=service.ingest).is_success
        assert service.linked_order(reported_study) == reported_id
        resource = service.client.get(f"/fhir/DiagnosticReport/{report['id']}", headers=service.clinician).json()
        assert resource["basedOn"] == [{"reference": f"ServiceRequest/{reported_id}"}]


def test_an_order_links_only_the_study_of_its_own_patient(tmp_path: Path) -> None:
    """Two sites' studies with the same accession number, one of MRN-1001 and one of a patient FHIR does not know.
    Before, the order for MRN-1001 linked both, and both were analyzed; whichever arrived first."""
    with ordered_only(tmp_path) as service:
        mrn = service.patient_ref("MRN-1001")
        study_first, order_first = _accession(), _accession()
        other_site = {"patient_id": "OTHER-77", "issuer": "urn:oid:9.9.9"}
        # the studies, then the order
        others_a, mine_a = service.store(study_first, **other_site), service.store(study_first)
        order_a = service.order(_order(mrn, study_first))
        # the order, then the studies
        order_b = service.order(_order(mrn, order_first))
        others_b, mine_b = service.store(order_first, **other_site), service.store(order_first)

        assert (service.linked_order(mine_a), service.linked_order(mine_b)) == (order_a, order_b)
        assert (service.linked_order(others_a), service.linked_order(others_b)) == (None, None)
        wait_for_report(service.client, mine_a, service.clinician)
        wait_for_report(service.client, mine_b, service.clinician)
        assert service.jobs(others_a) == [] and service.jobs(others_b) == []


def test_only_an_acsn_identifier_links_whichever_arrives_first(tmp_path: Path) -> None:
    """An order whose only identifier is a placer number (PLAC) equal to a study's accession number. Before, it was
    linked when the study came after it (the search matched any identifier type) and not when the study came
    first: the same order and study were analyzed or not by arrival order."""
    with ordered_only(tmp_path) as service:
        mrn = service.patient_ref("MRN-1001")
        order_first, study_first, control = _accession(), _accession(), _accession()
        service.order(_order(mrn, order_first, id_type="PLAC"))
        after_order = service.store(order_first)
        before_order = service.store(study_first)
        service.order(_order(mrn, study_first, id_type="PLAC"))
        assert (service.linked_order(after_order), service.linked_order(before_order)) == (None, None)

        service.order(_order(mrn, control))  # stored after both: its report means the sweeper passed them by
        wait_for_report(service.client, service.store(control), service.clinician)
        assert service.jobs(after_order) == [] and service.jobs(before_order) == []


def test_a_study_is_not_due_on_account_of_an_order_withdrawn_since_it_was_linked(any_runtime: Runtime) -> None:
    """The sweeper's query checks the linked order's current status as well: a study linked to an order that was
    deleted in a transaction that did not see the link (a new study and the DELETE at the same moment), or an
    analyzed study that keeps its link to an order revoked since, is not analyzed again on its account."""
    runtime = any_runtime
    fhir.process_bundle(runtime, patient_bundle(), principal=SYSTEM_PRINCIPAL)
    with runtime.sessions() as session:
        patient = clinical.find_patient_by_identifier(session=session, system="urn:oid:1.2.3.4.5", value="MRN-1001")
        assert patient is not None
        mrn = f"Patient/{patient.resource_id}"
    due: dict[str, str] = {}
    for name in ("in force", "completed", "deleted", "on hold"):
        accession = _accession()
        status = "completed" if name == "completed" else "active"
        written = fhir.write_one(
            runtime,
            principal=SYSTEM_PRINCIPAL,
            method="POST",
            url="ServiceRequest",
            resource=_order(mrn, accession, status=status),
        )
        study_uid = generate_uid()
        part = _with_accession(dx_instance(study_uid=study_uid), accession)
        ingest.store_instance(runtime, part, principal=SYSTEM_PRINCIPAL, part=1, protocol="test")
        due[name] = study_uid
        with runtime.sessions.begin() as session:  # withdrawn behind the link's back: the link stays
            assert studies.get_or_raise(session=session, study_instance_uid=study_uid).order_resource_id
            if name == "deleted":
                fhir_store.delete_resource(
                    session=session, resource_type="ServiceRequest", resource_id=written.resource_id
                )
            elif name == "on hold":
                held = {**_order(mrn, accession, status="on-hold"), "id": written.resource_id}
                fhir_store.put(
                    session=session,
                    resource_type="ServiceRequest",
                    resource_id=written.resource_id,
                    body=held,
                    patient_id=None,
                )
    with runtime.sessions() as session:
        found = studies.stable_unanalyzed(
            session=session, stable_before=utcnow() + dt.timedelta(seconds=1), ordered_only=True
        )
        assert sorted(s.study_instance_uid for s in found) == sorted([due["in force"], due["completed"]])
