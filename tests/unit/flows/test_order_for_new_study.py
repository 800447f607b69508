"""A study that arrives after its AI-read order finds it: by accession number (an active ServiceRequest) or through
an ImagingStudy of its Study Instance UID that is basedOn the order; both searches go in one SELECT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from service.flows import orders
from service.flows.runtime import Runtime, build_runtime
from service.store import fhir_store
from service.store.tables import Study
from tests.conftest import make_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Runtime:
    if request.param == "sqlite":
        return build_runtime(make_settings(tmp_path))
    return build_runtime(make_settings(tmp_path, database_url=request.getfixturevalue("postgres_url")))


def _order(resource_id: str, accession: str, status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": resource_id,
        "status": status,
        "intent": "order",
        "code": {"text": "AI read"},
        "subject": {"reference": "Patient/p1"},
        "identifier": [
            {"type": {"coding": [{"system": orders.ACCESSION_TYPE[0], "code": "ACSN"}]}, "value": accession}
        ],
    }


def _imaging_study(resource_id: str, study_uid: str, order_id: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": resource_id,
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": orders.DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
    }


def _put(session: Session, body: dict[str, Any]) -> None:
    fhir_store.put(
        session=session, resource_type=body["resourceType"], resource_id=body["id"], body=body, patient_id=None
    )


def _linked(session: Session, uid: str, accession: str | None) -> str | None:
    study = Study(study_instance_uid=uid, accession_number=accession, status="receiving")
    session.add(study)
    session.flush()
    orders.order_for_new_study(session, study)
    return study.order_resource_id


def test_a_new_study_finds_its_order(database: Runtime) -> None:
    runtime = database
    selects: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    with runtime.sessions.begin() as session:
        _put(session, _order("sr-1", "ACC-1"))
        _put(session, _order("sr-cancelled", "ACC-3", status="revoked"))
        _put(session, _order("sr-2", "ACC-OTHER"))
        _put(session, _imaging_study("img-2", "1.2.826.0.2", "sr-2"))
        event.listen(runtime.engine, "before_cursor_execute", note)
        try:
            assert _linked(session, "1.2.826.0.9", "ACC-NONE") is None
            assert len(selects) == 1 and "UNION ALL" in selects[0], selects  # both searches, one SELECT
            assert _linked(session, "1.2.826.0.1", "ACC-1") == "sr-1"  # by accession number
            assert _linked(session, "1.2.826.0.2", None) == "sr-2"  # through its ImagingStudy, no accession
            assert _linked(session, "1.2.826.0.3", "ACC-3") is None  # a revoked order is no order
        finally:
            event.remove(runtime.engine, "before_cursor_execute", note)


@pytest.mark.parametrize("accession", [",", "A,B", "X|Y", "C\\D$"])
def test_an_accession_number_with_search_delimiters_is_one_value(database: Runtime, accession: str) -> None:
    """An accession number is whatever the RIS made it. Before, "," was searched as no value (the object was then
    refused, 0x0110), "A,B" as A or B and "X|Y" as system X and code Y: a study could be joined to another order."""
    runtime = database
    with runtime.sessions.begin() as session:
        _put(session, _order("sr-a", "A"))
        _put(session, _order("sr-y", "Y"))
        _put(session, _order("sr-exact", accession))
        assert _linked(session, "1.2.826.0.7", accession) == "sr-exact"
        assert fhir_store.matching_ids(
            session=session,
            request=fhir_store.parse_search("ServiceRequest", [("identifier", fhir_store.escape(accession))]),
        ) == ["sr-exact"]
