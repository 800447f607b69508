"""Patients (with identifiers), normalized observations, conditions and the FHIR resources behind them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import Table, and_, delete, or_, select, tuple_
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from service.errors import NotFound
from service.schemas import ClinicalContext, ConditionFact, ObservationFact, PatientIdentifier
from service.store import db
from service.store.tables import Condition, Observation, Patient, Study
from service.store.tables import PatientIdentifier as IdentifierRow


def get_patient(*, session: Session, resource_id: str) -> Patient | None:
    return session.scalar(select(Patient).where(Patient.resource_id == resource_id))


def get_patient_or_raise(*, session: Session, resource_id: str) -> Patient:
    patient = get_patient(session=session, resource_id=resource_id)
    if patient is None:
        raise NotFound(f"Patient/{resource_id} not found")
    return patient


def patient_resource_id(*, session: Session, patient_id: int | None) -> str | None:
    """The FHIR Patient.id of a patient row (None for a study not joined to a patient).

    Kept in the session once looked up (a patient's resource id never changes): a report and its audit event ask
    for it in the same transaction, and the session's identity map holds rows only while something else does.
    """
    if patient_id is None:
        return None
    known: dict[int, str] = session.info.setdefault("patient_resource_ids", {})
    if patient_id not in known:
        patient = session.get(Patient, patient_id)
        if patient is None:
            return None
        known[patient_id] = patient.resource_id
    return known[patient_id]


def remember_patients(*, session: Session, patient_ids: Iterable[int | None]) -> None:
    """Look up the FHIR Patient.id of several patient rows in one SELECT, for ``patient_resource_id`` to find."""
    known: dict[int, str] = session.info.setdefault("patient_resource_ids", {})
    wanted = {i for i in patient_ids if i is not None and i not in known}
    if wanted:
        rows = session.execute(select(Patient.id, Patient.resource_id).where(Patient.id.in_(wanted)))
        known.update({patient_id: resource_id for patient_id, resource_id in rows})


def patient_reference(*, session: Session, patient_id: int | None) -> str | None:
    """``Patient/<id>`` for audit events and reports, or None."""
    resource_id = patient_resource_id(session=session, patient_id=patient_id)
    return f"Patient/{resource_id}" if resource_id is not None else None


def disclosed_patients(*, session: Session, studies: Iterable[Study]) -> tuple[str | None, dict[str, list[str]]]:
    """Whose data a list of studies discloses, for its audit event: (the patient's reference when there is exactly
    one, else None; ``{"patients": [Patient/<id>...], "dicom_patient_ids": [...]}``, the latter for studies not
    joined to a patient, each list sorted and at most 50 long)."""
    studies = list(studies)
    remember_patients(session=session, patient_ids=[study.patient_id for study in studies])  # one SELECT
    patients: set[str] = set()
    dicom_ids: set[str] = set()
    for study in studies:
        reference = patient_reference(session=session, patient_id=study.patient_id)
        if reference is not None:
            patients.add(reference)
        elif study.dicom_patient_id:
            issuer = f"{study.issuer_of_patient_id}|" if study.issuer_of_patient_id else ""
            dicom_ids.add(issuer + study.dicom_patient_id)
    single = next(iter(patients)) if len(patients) == 1 and not dicom_ids else None
    return single, {"patients": sorted(patients)[:50], "dicom_patient_ids": sorted(dicom_ids)[:50]}


def find_patient_by_identifier(*, session: Session, system: str | None, value: str) -> Patient | None:
    """Match a DICOM PatientID (+ IssuerOfPatientID) or a FHIR identifier to a patient.

    With a system (issuer) the match is exact. Without one, the value must identify exactly one patient;
    an ambiguous value matches nobody rather than the wrong person.
    """
    query = (
        select(Patient).join(IdentifierRow, IdentifierRow.patient_id == Patient.id).where(IdentifierRow.value == value)
    )
    if system:
        query = query.where(IdentifierRow.system == system)
    rows = list(session.scalars(query.limit(2)))  # one row per matching identifier, joined to its patient
    return rows[0] if len(rows) == 1 else None


def patient_and_identifier_rows(
    *, session: Session, resource_id: str, identifiers: list[PatientIdentifier]
) -> tuple[Patient | None, dict[tuple[str, str], IdentifierRow]]:
    """The patient of a resource id and the stored rows of these identifiers, in one SELECT: the patients that have
    this resource id or any of these identifiers, each joined to those of its identifiers that are among them.
    Each identifier row holds its patient (``row.patient``, loaded: no SELECT), which keeps it in the session.

    Returns:
        (the patient of this resource id or None, the stored rows of these identifiers by (system, value)).
    """
    wanted = {(i.system, i.value) for i in identifiers}
    if not wanted:
        return get_patient(session=session, resource_id=resource_id), {}
    pair = tuple_(IdentifierRow.system, IdentifierRow.value)
    holders = select(IdentifierRow.patient_id).where(pair.in_(wanted)).scalar_subquery()
    rows = session.execute(
        select(Patient, IdentifierRow)
        .outerjoin(IdentifierRow, and_(IdentifierRow.patient_id == Patient.id, pair.in_(wanted)))
        .where(or_(Patient.resource_id == resource_id, Patient.id.in_(holders)))
    ).all()
    stored: dict[tuple[str, str], IdentifierRow] = {}
    for holder, row in rows:
        if row is not None:
            set_committed_value(row, "patient", holder)
            stored[(row.system, row.value)] = row
    return next((found for found, _ in rows if found.resource_id == resource_id), None), stored


def add_identifiers(
    *,
    session: Session,
    patient: Patient,
    identifiers: list[PatientIdentifier],
    stored: dict[tuple[str, str], IdentifierRow],
) -> None:
    """Give the patient those of its identifiers not yet stored (``stored``: from
    :func:`patient_and_identifier_rows`); an identifier held by another patient stays with it."""
    for identifier in identifiers:
        key = (identifier.system, identifier.value)
        if key not in stored:
            stored[key] = IdentifierRow(patient_id=patient.id, system=identifier.system, value=identifier.value)
            session.add(stored[key])


def remove_facts(*, session: Session, resource_type: str, resource_id: str) -> None:
    """Forget the normalized facts of a resource (deleted, or replaced by a new version): an Observation's value
    and its components' ("<id>#<code>"), or a Condition."""
    if resource_type == "Observation":
        session.execute(
            delete(Observation).where(
                or_(Observation.resource_id == resource_id, Observation.resource_id.startswith(f"{resource_id}#"))
            )
        )
    elif resource_type == "Condition":
        session.execute(delete(Condition).where(Condition.resource_id == resource_id))


def put_observations(*, session: Session, facts: list[tuple[Patient, ObservationFact]]) -> None:
    """Store normalized observations (each with its patient), new or replacing the fact of the same resource id,
    in one executemany of ``INSERT ... ON CONFLICT (resource_id) DO UPDATE``: no SELECT first. Of two facts of one
    resource id, the last is kept."""
    if not facts:
        return
    rows = {
        fact.resource_id: {
            "resource_id": fact.resource_id,
            "patient_id": patient.id,
            "loinc": fact.loinc,
            "value": fact.value,
            "ucum_unit": fact.ucum_unit,
            "original_value": fact.original_value,
            "original_unit": fact.original_unit,
            "effective_at": fact.effective_at,
            "status": fact.status,
        }
        for patient, fact in facts
    }
    dialect = session.get_bind().dialect.name
    statement = _UPSERT_OBSERVATIONS.get(dialect)
    if statement is None:
        upsert = db.dialect_insert(session)(_OBSERVATIONS)
        columns = [name for name in next(iter(rows.values())) if name != "resource_id"]
        statement = _UPSERT_OBSERVATIONS[dialect] = upsert.on_conflict_do_update(
            index_elements=[_OBSERVATIONS.c.resource_id], set_={name: upsert.excluded[name] for name in columns}
        )
    session.execute(statement, list(rows.values()))


_OBSERVATIONS = cast(Table, Observation.__table__)
_UPSERT_OBSERVATIONS: dict[str, Any] = {}


def put_condition(*, session: Session, patient: Patient, fact: ConditionFact) -> None:
    row = session.scalar(select(Condition).where(Condition.resource_id == fact.resource_id))
    if row is None:
        row = Condition(resource_id=fact.resource_id, patient_id=patient.id)
        session.add(row)
    row.patient_id = patient.id
    row.system, row.code, row.display = fact.system, fact.code, fact.display
    row.clinical_status, row.onset_at = fact.clinical_status, fact.onset_at


def clinical_context(*, session: Session, patient: Patient | None) -> ClinicalContext:
    """Everything the models may use about one patient."""
    if patient is None:
        return ClinicalContext()
    rows = session.scalars(select(Observation).where(Observation.patient_id == patient.id).order_by(Observation.id))
    return ClinicalContext(
        gender=patient.gender,
        birth_date=patient.birth_date,
        observations=[
            ObservationFact(
                resource_id=row.resource_id,
                patient_ref=f"Patient/{patient.resource_id}",
                loinc=row.loinc,
                value=row.value,
                ucum_unit=row.ucum_unit,
                original_value=row.original_value,
                original_unit=row.original_unit,
                effective_at=row.effective_at,
                status=row.status,
            )
            for row in rows
        ],
    )
