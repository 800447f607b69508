"""A new study and the FHIR resource that it should be joined to (its Patient, its order), written at the same
moment in two transactions on PostgreSQL."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.flows import fhir, ingest, orders, queue
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import clinical, studies
from tests.conftest import make_settings
from tests.factories import dx_instance, patient_bundle


@pytest.fixture(params=["sqlite", "postgresql"])
def any_runtime(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)
    overrides: dict[str, Any] = {}
    if request.param == "postgresql":
        overrides["database_url"] = request.getfixturevalue("postgres_url")
    runtime = build_runtime(make_settings(tmp_path, batching=False, **overrides))
    set_runtime(runtime)
    yield runtime
    runtime.engine.dispose()


class Rendezvous:
    """Each side, once it has read what decides the link, waits (up to 1 s) for the other to have read too: without
    a lock both read before either commits; with one, the second reads only after the first has committed."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.arrived: list[str] = []

    def arrive(self) -> None:
        with self.condition:
            self.arrived.append(threading.current_thread().name)
            self.condition.notify_all()
            self.condition.wait_for(lambda: len(self.arrived) >= 2, timeout=1)

    def after(self, function: Callable[..., Any], thread: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            if threading.current_thread().name == thread:
                self.arrive()
            return result

        return wrapped


def _run_together(**targets: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(target,), name=name) for name, target in targets.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors


def _study(runtime: Runtime, study_uid: str) -> tuple[int | None, str | None]:
    with runtime.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        return study.patient_id, study.order_resource_id


def test_a_study_and_its_patient_stored_at_once_are_joined(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first radiograph of a study (PatientID MRN-2002) and a Bundle with the Patient of that MRN. Before, the
    study looked for its patient before the Bundle committed, and the Bundle looked for studies of its MRN before
    the study committed: the study stayed without a patient (and its analysis without clinical context)."""
    runtime = any_runtime
    rendezvous = Rendezvous()
    monkeypatch.setattr(ingest, "_patient_of_dicom_id", rendezvous.after(ingest._patient_of_dicom_id, "dicom"))
    monkeypatch.setattr(studies, "unlinked_for_patient_ids", rendezvous.after(studies.unlinked_for_patient_ids, "fhir"))
    study_uid = generate_uid()
    part = dx_instance(study_uid=study_uid, patient_id="MRN-2002", size=64)
    _run_together(
        dicom=lambda: ingest.store_instance(runtime, part, principal=SYSTEM_PRINCIPAL, part=1, protocol="test"),
        fhir=lambda: fhir.process_bundle(runtime, patient_bundle(patient_id="MRN-2002"), principal=SYSTEM_PRINCIPAL),
    )
    assert set(rendezvous.arrived) == {"dicom", "fhir"}
    with runtime.sessions() as session:
        patient = clinical.find_patient_by_identifier(session=session, system="urn:oid:1.2.3.4.5", value="MRN-2002")
        assert patient is not None
        assert _study(runtime, study_uid)[0] == patient.id


def test_a_study_and_its_order_stored_at_once_are_joined(any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first radiograph of a study and the active ServiceRequest with its accession number. Before, each looked
    for the other before the other committed: the study stayed without its order (and an order-only route never
    analyzed it)."""
    runtime = any_runtime
    fhir.process_bundle(runtime, patient_bundle(patient_id="MRN-3003"), principal=SYSTEM_PRINCIPAL)
    with runtime.sessions() as session:
        patient = clinical.find_patient_by_identifier(session=session, system="urn:oid:1.2.3.4.5", value="MRN-3003")
        assert patient is not None
        patient_resource_id = patient.resource_id
    study_uid = generate_uid()
    part = dx_instance(study_uid=study_uid, patient_id="MRN-3003", size=64)
    accession = str(pydicom.dcmread(io.BytesIO(part)).AccessionNumber)
    order = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "code": {"text": "AI read"},
        "subject": {"reference": f"Patient/{patient_resource_id}"},
        "identifier": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "value": accession,
            }
        ],
    }
    rendezvous = Rendezvous()
    monkeypatch.setattr(orders, "order_for_new_study", rendezvous.after(orders.order_for_new_study, "dicom"))
    monkeypatch.setattr(studies, "by_accession", rendezvous.after(studies.by_accession, "fhir"))
    outcome: list[Any] = []
    _run_together(
        dicom=lambda: ingest.store_instance(runtime, part, principal=SYSTEM_PRINCIPAL, part=1, protocol="test"),
        fhir=lambda: outcome.append(
            fhir.write_one(runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="ServiceRequest", resource=order)
        ),
    )
    assert set(rendezvous.arrived) == {"dicom", "fhir"}
    assert _study(runtime, study_uid)[1] == outcome[0].resource_id
