"""A FHIR Patient is matched by resource id or by any stored identifier (found with one SELECT); identifiers of two
different patients are refused; identifiers never move from one patient to another."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import event

from service.errors import InvalidInput
from service.flows import ingest
from service.flows.runtime import Runtime, build_runtime
from service.schemas import PatientFacts, PatientIdentifier
from service.store.tables import Patient
from service.store.tables import PatientIdentifier as IdentifierRow
from tests.conftest import make_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Runtime:
    if request.param == "sqlite":
        return build_runtime(make_settings(tmp_path))
    return build_runtime(make_settings(tmp_path, database_url=request.getfixturevalue("postgres_url")))


def _facts(resource_id: str, *values: str, gender: str = "female") -> PatientFacts:
    return PatientFacts(
        resource_id=resource_id,
        identifiers=[PatientIdentifier(system="urn:mrn", value=value) for value in values],
        gender=gender,
        birth_date=dt.date(1950, 1, 2),
    )


def test_a_patient_is_matched_by_resource_id_or_identifier(database: Runtime) -> None:
    with database.sessions.begin() as session:
        first = ingest.upsert_patient(session, _facts("p1", "A"))
        second = ingest.upsert_patient(session, _facts("p2", "B"))
        first_id, second_id = first.id, second.id
    statements: list[str] = []
    event.listen(database.engine, "before_cursor_execute", lambda _c, _k, statement, *_: statements.append(statement))
    with database.sessions.begin() as session:
        statements.clear()
        by_identifier = ingest.upsert_patient(session, _facts("p1-elsewhere", "A", "C", gender="male"))
        assert by_identifier.id == first_id and by_identifier.gender == "male"
        found = [s for s in statements if "FROM patients" in s and s.lstrip().upper().startswith("SELECT")]
        assert len(found) == 1  # the patient and its identifiers together; none again for the match
    with database.sessions.begin() as session:
        assert ingest.upsert_patient(session, _facts("p2", "B")).id == second_id
    with database.sessions() as session:
        rows = {(row.value, row.patient_id) for row in session.query(IdentifierRow)}
        assert rows == {("A", first_id), ("B", second_id), ("C", first_id)}
        assert session.query(Patient).count() == 2


def test_identifiers_of_two_patients_are_refused_and_nothing_moves(database: Runtime) -> None:
    with database.sessions.begin() as session:
        ingest.upsert_patient(session, _facts("p1", "A"))
        ingest.upsert_patient(session, _facts("p2", "B"))
    with pytest.raises(InvalidInput, match="2 different patients"), database.sessions.begin() as session:
        ingest.upsert_patient(session, _facts("p3", "A", "B"))
    with database.sessions.begin() as session:  # the resource id wins; B stays with p2
        kept = ingest.upsert_patient(session, _facts("p1", "A", "B"))
        kept_id = kept.id
    with database.sessions() as session:
        owners = {row.value: row.patient_id for row in session.query(IdentifierRow)}
        assert owners["A"] == kept_id and owners["B"] != kept_id
        assert session.query(Patient).count() == 2
