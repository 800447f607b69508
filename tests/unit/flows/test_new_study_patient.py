"""A new study whose DICOM PatientID names a known patient is created joined to it: the patient's id goes in the
study's INSERT (no UPDATE after it), and the store's audit event names the patient."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, select

from service.flows import fhir, ingest
from service.flows.runtime import Runtime, build_runtime
from service.schemas import Principal
from service.store import audit, studies
from service.store.tables import AuditEvent, Patient
from service.training.cohort_files import make_patient_case
from tests.conftest import make_settings

SENDER = Principal(subject="pacs", role="ingest")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Runtime:
    if request.param == "sqlite":
        return build_runtime(make_settings(tmp_path))
    return build_runtime(make_settings(tmp_path, database_url=request.getfixturevalue("postgres_url")))


def test_a_new_study_of_a_known_patient_is_inserted_joined_to_it(database: Runtime) -> None:
    known = make_patient_case(11, index=0, size=64)
    fhir.process_bundle(database, known.bundle, principal=SENDER)
    statements: list[str] = []
    event.listen(database.engine, "before_cursor_execute", lambda _c, _k, statement, *_: statements.append(statement))

    stored = ingest.store_instance(database, known.dicom, principal=SENDER, part=1, protocol="stow-rs")

    assert isinstance(stored, ingest.StoredInstance) and stored.new
    assert not [s for s in statements if s.lstrip().upper().startswith("UPDATE STUDIES")]
    assert len([s for s in statements if s.lstrip().upper().startswith("INSERT INTO STUDIES")]) == 1
    with database.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=known.study_instance_uid)
        patient = session.get(Patient, study.patient_id)
        assert patient is not None and patient.resource_id == known.bundle["entry"][0]["resource"]["id"]
        stored_event = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dicom.store")).one()
        assert stored_event.patient_ref == f"Patient/{patient.resource_id}"
        assert audit.verify(session=session)[1] is None


def test_a_new_study_of_an_unknown_patient_is_joined_when_the_patient_arrives(database: Runtime) -> None:
    case = make_patient_case(11, index=1, size=64)
    stored = ingest.store_instance(database, case.dicom, principal=SENDER, part=1, protocol="stow-rs")
    assert isinstance(stored, ingest.StoredInstance) and stored.new
    with database.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=case.study_instance_uid)
        assert study.patient_id is None and study.dicom_patient_id
        stored_event = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "dicom.store")).one()
        assert stored_event.patient_ref is None
    fhir.process_bundle(database, case.bundle, principal=SENDER)
    with database.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=case.study_instance_uid)
        assert study.patient_id is not None
