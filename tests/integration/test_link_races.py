"""A new study and the FHIR resource that it should be joined to (its Patient, its order), written at the same
moment in two transactions on PostgreSQL."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from service.flows import fhir, ingest, orders, queue
from service.flows.runtime import Runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import clinical, db, studies
from tests.factories import dx_instance, observation, patient_bundle


@pytest.fixture(autouse=True)
def no_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)


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

    def on_first_looks(self, matches: Callable[[Any, str, str], list[str]]) -> Callable[..., Any]:
        """The lookup of a conditional write's matches (``fhir._condition_matches``), whose first look in threads
        "one" and "two" (each request's parse, outside its write transaction) waits for the other's."""

        def waiting(session: Any, resource_type: str, query: str) -> list[str]:
            found = matches(session, resource_type, query)
            if threading.current_thread().name in ("one", "two") and len(self.arrived) < 2:
                self.arrive()
            return found

        return waiting

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


def _patient_resource(mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.4.5", "value": mrn}],
        "gender": "female",
        "birthDate": "1961-05-02",
    }


def _create_twice_at_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, url: str, resource: dict[str, Any], condition: str
) -> dict[str, Any]:
    """The outcomes of two identical conditional creates, whose parses each look for a match before either's
    write transaction starts."""
    monkeypatch.setattr(fhir, "_condition_matches", Rendezvous().on_first_looks(fhir._condition_matches))
    outcomes: dict[str, Any] = {}

    def create(name: str) -> Callable[[], None]:
        def run() -> None:
            outcomes[name] = fhir.write_one(
                runtime, principal=SYSTEM_PRINCIPAL, method="POST", url=url, resource=resource, if_none_exist=condition
            )

        return run

    _run_together(one=create("one"), two=create("two"))
    return outcomes


def test_two_identical_conditional_creates_make_one_patient(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ``POST Patient`` with ``If-None-Exist: identifier=...`` at the same moment. Each looks for a match (none)
    before either commits. Before, the condition was only checked before the write transaction, so both created
    a Patient (and the second then clashed on the identifier: an unhandled error). Now the write transaction
    serializes on the condition and checks it again: one 201 Created, one 200 with the same resource."""
    runtime = any_runtime
    outcomes = _create_twice_at_once(
        runtime, monkeypatch, "Patient", _patient_resource("MRN-4004"), "identifier=urn:oid:1.2.3.4.5|MRN-4004"
    )
    assert sorted(outcome.status for outcome in outcomes.values()) == [200, 201]
    assert outcomes["one"].resource_id == outcomes["two"].resource_id
    with runtime.sessions() as session:
        ids = orders.resolver(session)("Patient", "identifier=MRN-4004")
    assert ids == [outcomes["one"].resource_id]


def test_two_first_writes_of_one_patient_identifier_make_one_patient(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Bundles, each with a new Patient of the same MRN, at the same moment. Before, both looked the MRN up
    before either committed, both created a patient, and the second's identifier clashed: an IntegrityError (a
    500 for the sender). Now the second waits, then finds the first's patient and updates it."""
    runtime = any_runtime
    rendezvous = Rendezvous()
    monkeypatch.setattr(
        clinical, "patient_and_identifier_rows", rendezvous.after(clinical.patient_and_identifier_rows, "one")
    )
    monkeypatch.setattr(
        clinical, "patient_and_identifier_rows", rendezvous.after(clinical.patient_and_identifier_rows, "two")
    )
    responses: dict[str, Any] = {}

    def send(name: str, seed: int) -> Callable[[], None]:
        def run() -> None:
            bundle = patient_bundle(patient_id="MRN-5005", seed=seed)
            responses[name] = fhir.process_bundle(runtime, bundle, principal=SYSTEM_PRINCIPAL)

        return run

    _run_together(one=send("one", 1), two=send("two", 2))
    assert {entry["response"]["status"][:3] for r in responses.values() for entry in r["entry"]} <= {"200", "201"}
    with runtime.sessions() as session:
        assert orders.resolver(session)("Patient", "identifier=MRN-5005") != []
        assert len(orders.resolver(session)("Patient", "identifier=MRN-5005")) == 1


def test_two_first_writes_of_one_condition_id_both_succeed(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PUT Condition/<id>`` twice at the same moment, the resource new. Before, both wrote the derived condition
    row after finding none, and the second clashed: an unhandled IntegrityError. Now they are serialized on the
    resource: version 1, then version 2."""
    runtime = any_runtime
    patient = fhir.write_one(
        runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="Patient", resource=_patient_resource("MRN-6006")
    )
    rendezvous = Rendezvous()
    real_put_condition = clinical.put_condition

    def wait_then_put(**kwargs: Any) -> None:
        rendezvous.arrive()  # both about to look for the condition's row
        real_put_condition(**kwargs)

    monkeypatch.setattr(clinical, "put_condition", wait_then_put)
    condition_id = "cond-" + generate_uid().rsplit(".", 1)[-1]
    outcomes: dict[str, Any] = {}

    def put(name: str, code: str) -> Callable[[], None]:
        def run() -> None:
            outcomes[name] = fhir.write_one(
                runtime,
                principal=SYSTEM_PRINCIPAL,
                method="PUT",
                url=f"Condition/{condition_id}",
                resource={
                    "resourceType": "Condition",
                    "id": condition_id,
                    "clinicalStatus": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
                        ]
                    },
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]},
                    "subject": {"reference": f"Patient/{patient.resource_id}"},
                },
            )

        return run

    _run_together(one=put("one", "13645005"), two=put("two", "195967001"))
    assert sorted(outcome.version for outcome in outcomes.values()) == [1, 2]
    assert sorted(outcome.status for outcome in outcomes.values()) == [200, 201]


def test_two_identical_conditional_creates_of_an_observation_make_one(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for an Observation, which no unique key protects: before, both requests created one (two heart
    rates where the sender asked for one). Now the second's write transaction finds the first's Observation when
    it checks the condition again, and answers 200 with it."""
    runtime = any_runtime
    patient = fhir.write_one(
        runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="Patient", resource=_patient_resource("MRN-7007")
    )
    body = observation(f"Patient/{patient.resource_id}", "heart_rate", 88.0)["resource"]
    body["identifier"] = [{"system": "urn:oid:1.2.3.4.5.6", "value": "hr-7007-1"}]
    outcomes = _create_twice_at_once(
        runtime, monkeypatch, "Observation", body, "identifier=urn:oid:1.2.3.4.5.6|hr-7007-1"
    )
    assert sorted(outcome.status for outcome in outcomes.values()) == [200, 201]
    assert outcomes["one"].resource_id == outcomes["two"].resource_id
    with runtime.sessions() as session:
        assert orders.resolver(session)("Observation", "identifier=hr-7007-1") == [outcomes["one"].resource_id]


def test_a_conditional_update_whose_match_appears_before_its_write_locks_that_resource(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The condition of a PUT matched nothing when its request was parsed; another request created a match before
    its write transaction. The write, parsed again there, updates that resource. Before, it did so without the
    resource's lock, which every other write of the resource takes (a plain PUT of it could interleave)."""
    runtime = any_runtime
    body = _heart_rate_of_a_new_patient(runtime, "MRN-8008", identifier="hr-8008-1")
    created: list[str] = []
    real_matches = fhir._condition_matches

    def match_appears_after_the_first_look(session: Any, resource_type: str, query: str) -> list[str]:
        found = real_matches(session, resource_type, query)
        if not created:
            created.append("pending")
            outcome = fhir.write_one(
                runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="Observation", resource=dict(body)
            )
            created[0] = outcome.resource_id
        return found

    locked: list[str] = []
    real_serialize = db.serialize_on

    def recorded(session: Any, keys: Any) -> None:
        locked.extend(keys)
        real_serialize(session, keys)

    monkeypatch.setattr(fhir, "_condition_matches", match_appears_after_the_first_look)
    monkeypatch.setattr(db, "serialize_on", recorded)
    outcome = _conditional_put(runtime, body, "hr-8008-1")
    assert outcome.resource_id == created[0] and outcome.status == 200
    assert f"fhir:Observation/{created[0]}" in locked


def test_a_conditional_update_checks_its_condition_again_once_the_late_resource_lock_is_held(
    any_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review. The conditional PUT's match R appears after its parse, while a plain PUT of R, changing R
    so that it no longer matches, holds R's lock. Before, the conditional PUT waited for that lock and then
    overwrote R with its own body (PostgreSQL): the plain PUT's change lost, an outcome of neither order. Now the
    condition is checked again once the lock is held: R keeps the change, and the conditional PUT creates."""
    runtime = any_runtime
    body = _heart_rate_of_a_new_patient(runtime, "MRN-9009", identifier="hr-9009-X")
    changing, release = threading.Event(), threading.Event()
    real_apply = fhir._apply

    def apply_then_hold(session: Any, parsed: Any, indexes: Any) -> Any:
        outcomes = real_apply(session, parsed, indexes)
        if threading.current_thread().name == "plain-put":
            changing.set()
            release.wait(10)  # R's lock held, the change not committed
        return outcomes

    state: dict[str, Any] = {}
    real_matches = fhir._condition_matches

    def plain_put() -> None:
        changed = body | {"id": state["r"], "identifier": [{"system": "urn:oid:1.2.3.4.5.6", "value": "hr-9009-Y"}]}
        state["plain"] = fhir.write_one(
            runtime, principal=SYSTEM_PRINCIPAL, method="PUT", url=f"Observation/{state['r']}", resource=changed
        )

    def r_appears_and_changes(session: Any, resource_type: str, query: str) -> list[str]:
        found = real_matches(session, resource_type, query)
        if "r" not in state:  # the conditional PUT's parse found nothing; now R is created, and a PUT changes it
            created = fhir.write_one(
                runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="Observation", resource=body
            )
            state["r"] = created.resource_id
            state["thread"] = threading.Thread(target=plain_put, name="plain-put")
            state["thread"].start()
            assert changing.wait(10)
            threading.Timer(1.0, release.set).start()
        return found

    monkeypatch.setattr(fhir, "_apply", apply_then_hold)
    monkeypatch.setattr(fhir, "_condition_matches", r_appears_and_changes)
    conditional = _conditional_put(runtime, body, "hr-9009-X")
    state["thread"].join(10)
    assert state["plain"].version == 2
    with runtime.sessions() as session:
        assert orders.resolver(session)("Observation", "identifier=hr-9009-Y") == [state["r"]], "the change kept"
    assert conditional.resource_id != state["r"] and conditional.status == 201


def _heart_rate_of_a_new_patient(runtime: Runtime, mrn: str, *, identifier: str) -> dict[str, Any]:
    """A heart rate Observation (not stored) of a Patient stored now, with the business identifier ``identifier``."""
    patient = fhir.write_one(
        runtime, principal=SYSTEM_PRINCIPAL, method="POST", url="Patient", resource=_patient_resource(mrn)
    )
    body: dict[str, Any] = observation(f"Patient/{patient.resource_id}", "heart_rate", 70.0)["resource"]
    body["identifier"] = [{"system": "urn:oid:1.2.3.4.5.6", "value": identifier}]
    return body


def _conditional_put(runtime: Runtime, body: dict[str, Any], identifier: str) -> Any:
    """``PUT Observation?identifier=...`` of ``body`` with another value."""
    return fhir.write_one(
        runtime,
        principal=SYSTEM_PRINCIPAL,
        method="PUT",
        url=f"Observation?identifier=urn:oid:1.2.3.4.5.6|{identifier}",
        resource=body | {"valueQuantity": {**body["valueQuantity"], "value": 72.0}},
    )
