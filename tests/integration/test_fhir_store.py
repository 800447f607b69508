"""The FHIR resource store on SQLite and PostgreSQL: versions, vread, deletion, If-Match, and every kind of search
parameter, paging and refusal of what we do not support."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.errors import Conflict, Gone, InvalidInput, NotFound, PreconditionFailed
from service.store import db, fhir_store


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{tmp_path / 'fhir.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine: Engine = db.make_engine(url)
    db.upgrade(engine)
    with db.make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def observation(resource_id: str, *, code: str, when: str, patient: str = "p1", status: str = "final") -> dict:
    return {
        "resourceType": "Observation",
        "id": resource_id,
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": when,
        "identifier": [{"system": "urn:lab", "value": f"lab-{resource_id}"}],
    }


def put(session: Session, body: dict, **kwargs: object) -> tuple:
    return fhir_store.put(
        session=session,
        resource_type=body["resourceType"],
        resource_id=body["id"],
        body=body,
        patient_id=None,
        **kwargs,
    )


def search(session: Session, resource_type: str, *params: tuple[str, str]) -> tuple[list[str], int]:
    rows, total = fhir_store.search(session=session, request=fhir_store.parse_search(resource_type, params))
    return [row.resource_id for row in rows], total


def test_versions_vread_delete_and_if_match(session: Session) -> None:
    row, created = put(session, observation("o1", code="1988-5", when="2026-11-20T08:00:00Z"))
    assert created and row.version == 1 and row.body["meta"]["versionId"] == "1"
    row, created = put(session, observation("o1", code="1988-5", when="2026-11-20T09:00:00Z"), if_match=1)
    assert not created and row.version == 2
    with pytest.raises(PreconditionFailed):
        put(session, observation("o1", code="1988-5", when="2026-11-20T10:00:00Z"), if_match=1)
    assert (
        fhir_store.vread(session=session, resource_type="Observation", resource_id="o1", version=1)["effectiveDateTime"]
        == "2026-11-20T08:00:00Z"
    )
    fhir_store.delete_resource(session=session, resource_type="Observation", resource_id="o1")
    with pytest.raises(Gone):
        fhir_store.read(session=session, resource_type="Observation", resource_id="o1")
    with pytest.raises(NotFound):
        fhir_store.read(session=session, resource_type="Observation", resource_id="never")
    assert search(session, "Observation", ("code", "1988-5")) == ([], 0), "a deleted resource is not found"
    history = fhir_store.history(session=session, resource_type="Observation", resource_id="o1")
    assert [(h.version, h.body is None) for h in history] == [(3, True), (2, False), (1, False)]
    put(session, observation("o1", code="1988-5", when="2026-11-21"))  # re-created after deletion
    assert fhir_store.read(session=session, resource_type="Observation", resource_id="o1").version == 4


def test_produced_resources_cannot_be_written_by_clients(session: Session) -> None:
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "code": {"text": "x"}}
    put(session, report, origin="result")
    with pytest.raises(Conflict):
        put(session, report)


def test_token_reference_date_and_string_searches(session: Session) -> None:
    put(session, observation("a", code="1988-5", when="2026-11-20T08:00:00Z"))
    put(session, observation("b", code="8310-5", when="2026-11-21T08:00:00Z"))
    put(session, observation("c", code="1988-5", when="2026-10-01", patient="p2", status="entered-in-error"))
    put(session, {"resourceType": "Patient", "id": "p1", "name": [{"family": "O'Brien", "given": ["Ann"]}]})
    assert search(session, "Observation", ("code", "1988-5")) == (["a", "c"], 2)
    assert search(session, "Observation", ("code", "http://loinc.org|8310-5,http://loinc.org|1988-5"))[1] == 3
    assert search(session, "Observation", ("code", "http://other|1988-5")) == ([], 0)
    assert search(session, "Observation", ("patient", "p2")) == (["c"], 1)
    assert search(session, "Observation", ("subject", "Patient/p1"), ("code", "1988-5")) == (["a"], 1)
    assert search(session, "Observation", ("status:not", "entered-in-error"))[0] == ["a", "b"]
    assert search(session, "Observation", ("identifier", "urn:lab|lab-b")) == (["b"], 1)
    assert search(session, "Observation", ("date", "2026-11-20")) == (["a"], 1)
    assert search(session, "Observation", ("date", "ge2026-11-20"))[0] == ["a", "b"]
    assert search(session, "Observation", ("date", "lt2026-11"))[0] == ["c"]
    assert search(session, "Observation", ("date", "ge2026-11-01"), ("date", "lt2026-11-21"))[0] == ["a"]
    assert search(session, "Patient", ("name", "o'b")) == (["p1"], 1)
    assert search(session, "Patient", ("family:exact", "o'brien")) == (["p1"], 1)
    assert search(session, "Patient", ("name", "%")) == ([], 0), "LIKE wildcards in a value are literal"
    assert search(session, "Observation", ("_id", "a,b"))[0] == ["a", "b"]
    assert search(session, "Observation", ("_lastUpdated", "gt2000-01-01"))[1] == 3


def test_paging_and_sorting(session: Session) -> None:
    for number in range(7):
        put(session, observation(f"o{number}", code="1988-5", when="2026-11-20"))
    first, total = search(session, "Observation", ("_count", "3"))
    assert total == 7 and first == ["o0", "o1", "o2"]
    last, _ = search(session, "Observation", ("_count", "3"), ("_offset", "6"))
    assert last == ["o6"]
    newest, _ = search(session, "Observation", ("_sort", "-_lastUpdated"), ("_count", "1"))
    assert newest == ["o6"]
    assert search(session, "Observation", ("_summary", "count")) == ([], 7)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([("colour", "red")], "cannot be searched by 'colour'"),
        ([("code:below", "x")], "modifier :below"),
        ([("_count", "many")], "_count"),
        ([("_count", "100000")], "_count"),
        ([("_sort", "status")], "_sort"),
        ([("_elements", "id")], "cannot be searched by '_elements'"),
    ],
)
def test_unsupported_searches_are_refused_not_ignored(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        fhir_store.parse_search("Observation", params)
    assert message in raised.value.message


def test_a_bad_date_is_refused(session: Session) -> None:
    with pytest.raises(InvalidInput):
        search(session, "Observation", ("date", "yesterday"))


def _stored_state(session: Session) -> list[tuple]:
    """Everything a write leaves behind, without surrogate keys and timestamps: current rows, versions, search
    values (per resource)."""
    from sqlalchemy import select

    from service.store.tables import FhirResource, FhirResourceVersion, FhirSearchValue

    def plain(body: dict | None) -> dict | None:
        return None if body is None else {**body, "meta": {**body["meta"], "lastUpdated": "-"}}

    rows = session.scalars(select(FhirResource).order_by(FhirResource.resource_id)).all()
    keys = {row.id: row.resource_id for row in rows}
    return [
        *[(r.resource_type, r.resource_id, r.version, r.origin, r.deleted, plain(r.body)) for r in rows],
        *sorted(
            (v.resource_type, v.resource_id, v.version, str(plain(v.body)))
            for v in session.scalars(select(FhirResourceVersion))
        ),
        *sorted(
            (keys[v.resource_pk], v.param, v.system or "", v.value or "", str(v.date_start), str(v.date_end))
            for v in session.scalars(select(FhirSearchValue))
        ),
    ]


def _requests(when: str) -> list[fhir_store.PutRequest]:
    bodies = [
        observation("o1", code="1988-5", when=when),
        observation("o2", code="8310-5", when=when, status="amended"),
        {"resourceType": "Patient", "id": "p1", "gender": "female", "name": [{"family": "Doe", "given": ["Jo"]}]},
    ]
    return [fhir_store.PutRequest(b["resourceType"], b["id"], b, None) for b in bodies]


def test_put_many_writes_what_one_put_after_another_writes(session: Session, tmp_path: Path) -> None:
    other_engine = db.make_engine(f"sqlite:///{tmp_path / 'one-by-one.db'}")
    db.upgrade(other_engine)
    with db.make_session_factory(other_engine)() as one_by_one:
        for when in ("2026-11-20T08:00:00Z", "2026-11-21"):  # creates, then updates of the same resources
            written = fhir_store.put_many(session=session, requests=_requests(when))
            for request in _requests(when):
                put(one_by_one, request.body)
            assert [(row.resource_id, row.version) for row, _ in written] == [
                (r.resource_id, 1 if when.startswith("2026-11-20") else 2) for r in _requests(when)
            ]
            assert [created for _, created in written] == [when.startswith("2026-11-20")] * 3
        session.flush()
        assert _stored_state(session) == _stored_state(one_by_one)
    other_engine.dispose()
    assert search(session, "Observation", ("date", "2026-11-21")) == (["o1", "o2"], 2)
    assert search(session, "Patient", ("family", "doe")) == (["p1"], 1)


def test_put_many_refuses_as_put_does_and_writes_nothing(session: Session) -> None:
    fhir_store.put_many(session=session, requests=_requests("2026-11-20"))
    session.commit()
    stale = fhir_store.PutRequest("Observation", "o2", observation("o2", code="1", when="2026"), None, if_match=7)
    with pytest.raises(PreconditionFailed, match=r"^Bundle.entry\[1\]: Observation/o2 is at version 1"):
        fhir_store.put_many(
            session=session,
            requests=[
                _requests("2026-11-22")[0],
                fhir_store.PutRequest(**{**stale.__dict__, "where": "Bundle.entry[1]"}),
            ],
        )
    session.rollback()
    report = {"resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "code": {"text": "x"}}
    fhir_store.put_many(
        session=session, requests=[fhir_store.PutRequest("DiagnosticReport", "r1", report, None, origin="result")]
    )
    with pytest.raises(Conflict):
        fhir_store.put_many(session=session, requests=[fhir_store.PutRequest("DiagnosticReport", "r1", report, None)])
    assert fhir_store.read(session=session, resource_type="Observation", resource_id="o1").version == 1


def test_put_many_create_only_keeps_an_existing_resource(session: Session) -> None:
    device = {"resourceType": "Device", "id": "d1", "status": "active"}
    first = fhir_store.put_many(
        session=session, requests=[fhir_store.PutRequest("Device", "d1", device, None, create_only=True)]
    )
    again = fhir_store.put_many(
        session=session,
        requests=[fhir_store.PutRequest("Device", "d1", {**device, "status": "inactive"}, None, create_only=True)],
    )
    assert [(row.version, created) for row, created in first + again] == [(1, True), (1, False)]
    assert fhir_store.read(session=session, resource_type="Device", resource_id="d1").body["status"] == "active"
    assert len(fhir_store.history(session=session, resource_type="Device", resource_id="d1")) == 1


def test_put_many_new_is_not_looked_for_yet_a_wrong_guess_writes_what_put_writes(session: Session) -> None:
    fhir_store.put_many(session=session, requests=_requests("2026-11-20"))
    session.commit()
    guessed = [fhir_store.PutRequest(**{**r.__dict__, "new": True}) for r in _requests("2026-11-21")]
    guessed.append(fhir_store.PutRequest("Observation", "o3", observation("o3", code="1", when="2026"), None, new=True))
    written = fhir_store.put_many(session=session, requests=guessed)
    assert [(row.resource_id, row.version, created) for row, created in written] == [
        ("o1", 2, False),
        ("o2", 2, False),
        ("p1", 2, False),
        ("o3", 1, True),
    ]
    assert search(session, "Observation", ("date", "2026-11-21")) == (["o1", "o2"], 2)
    session.commit()
    produced = fhir_store.PutRequest(
        "Observation", "o1", observation("o1", code="1", when="2026"), None, origin="result"
    )
    with pytest.raises(Conflict):  # the checks of put hold for a resource wrongly said to be new
        fhir_store.put_many(session=session, requests=[fhir_store.PutRequest(**{**produced.__dict__, "new": True})])


def test_search_values_are_stored_as_extracted(session: Session) -> None:
    """PostgreSQL takes the values as arrays in one INSERT (unnest), SQLite row by row: every value of every kind
    (token with and without system, reference, lower-case string, date range in UTC, nulls) comes back as extracted."""
    from sqlalchemy import select

    from service.store.tables import FhirSearchValue

    body = {
        **observation("o9", code="1988-5", when="2026-11-20T08:00:00+02:00"),
        "category": [{"coding": [{"code": "laboratory"}]}],
        "valueString": "Elevated",
    }
    row, _ = put(session, body)
    expected = sorted(
        ((v["param"], v["system"], v["value"], v["date_start"], v["date_end"]) for v in fhir_store._search_rows(row)),
        key=str,
    )
    stored = sorted(
        (
            (v.param, v.system, v.value, v.date_start, v.date_end)
            for v in session.scalars(select(FhirSearchValue).where(FhirSearchValue.resource_pk == row.id))
        ),
        key=str,
    )
    assert stored == expected
    assert any(v[3] is not None for v in stored) and any(v[1] is None for v in stored)
    dated = next(v for v in stored if v[3] is not None)
    assert dated[3].utcoffset().total_seconds() == 0 and dated[3].hour == 6


def test_concurrent_creates_of_one_resource_make_two_versions(postgres_url: str) -> None:
    """Two writers create the same new resource at once: the second INSERT waits for the first commit, skips the
    clash and the write becomes an update (version 2), not an error. PostgreSQL only: SQLite serializes writers."""
    import threading

    engine = db.make_engine(postgres_url)
    db.upgrade(engine)
    sessions = db.make_session_factory(engine)
    first_written = threading.Event()
    outcome: list[tuple[int, bool]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            first_written.wait(10)
            with sessions.begin() as other:  # finds no row, then its INSERT waits on the first transaction's
                row, created = put(other, observation("o1", code="1988-5", when="2026-11-20T09:00:00Z"))
                outcome.append((row.version, created))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    try:
        with sessions.begin() as first:
            row, created = put(first, observation("o1", code="1988-5", when="2026-11-20T08:00:00Z"))
            assert created and row.version == 1
            first_written.set()
            thread.join(0.5)
            assert not outcome  # still waiting on this transaction
        thread.join()
        assert not errors and outcome == [(2, False)]
        with sessions() as session:
            history = fhir_store.history(session=session, resource_type="Observation", resource_id="o1")
            assert sorted(v.version for v in history) == [1, 2]
    finally:
        engine.dispose()
