"""The store on both databases: migrations, uniqueness in the database, the audit chain."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, event, update
from sqlalchemy.exc import IntegrityError

from service.errors import NotFound
from service.schemas import (
    FindingResult,
    Findings,
    JobStage,
    JobState,
    ModelIdentity,
    NormalizedInstance,
    ObservationFact,
    PatientIdentifier,
    Principal,
)
from service.store import audit, clinical, db, jobs, reports, studies
from service.store.tables import AuditEvent, AuditHead, Instance, Job, Observation, Patient, Report, Series, Study
from service.store.tables import PatientIdentifier as PatientIdentifierRow


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    built = db.make_engine(url)
    db.upgrade(built)
    yield built
    built.dispose()


def _meta(**overrides: object) -> NormalizedInstance:
    values: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "sop_instance_uid": "1.2.3.1.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "DX",
        "rows": 512,
        "columns": 512,
    }
    values.update(overrides)
    return NormalizedInstance(**values)  # type: ignore[arg-type]


def _findings() -> Findings:
    return Findings(
        model=ModelIdentity(
            name="m", version="1", sha256="0" * 64, execution_provider="CPUExecutionProvider", intended_use="test"
        ),
        findings=[FindingResult(code="8186001", display="Cardiomegaly", probability=0.7, threshold=0.5, positive=True)],
        clinical_inputs=[],
        missing_inputs=[],
        source_sop_instance_uid="1.2.3.1.1",
    )


def test_sop_instance_uid_is_unique_in_the_database(engine: Engine) -> None:
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        _, new = studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        assert new
        _, again = studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        assert not again
    with pytest.raises(IntegrityError), sessions.begin() as session:
        series = session.query(Series).one()
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid="1.2.3.1.1",
                sop_class_uid="1",
                transfer_syntax_uid="1",
                blob_key="b",
                size_bytes=1,
                sha256="y",
            )
        )


def test_one_report_per_study_and_model_version(engine: Engine) -> None:
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        study = studies.get_or_raise(session=session, study_instance_uid="1.2.3")
        job, created = jobs.get_or_create(session=session, study=study, model_name="m", model_version="1")
        assert created
        same, created_again = jobs.get_or_create(session=session, study=study, model_name="m", model_version="1")
        assert same.id == job.id and not created_again
        first, made = reports.create_once(session=session, job=job, study=study, findings=_findings())
        second, made_again = reports.create_once(session=session, job=job, study=study, findings=_findings())
        assert made and not made_again and first.id == second.id
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(
            Report(
                id="other",
                study_id=study.id,
                job_id=job.id,
                model_name="m",
                model_version="1",
                model_sha256="0" * 64,
                execution_provider="x",
                source_sop_instance_uid="1",
                clinical_inputs=[],
                missing_inputs=[],
                intended_use="t",
            )
        )


def test_audit_chain_verifies_and_detects_edits_and_deletions(engine: Engine) -> None:
    sessions = db.make_session_factory(engine)
    principal = Principal(subject="tester", role="admin")
    for i in range(5):
        with sessions.begin() as session:
            audit.append(
                session=session,
                principal=principal,
                event_type="test",
                action="R",
                detail={"i": i, "when": dt.date(2026, 1, 1).isoformat()},
            )
    with sessions() as session:
        assert audit.verify(session=session) == (5, None)
    with sessions.begin() as session:
        third = session.query(AuditEvent).order_by(AuditEvent.id).all()[2]
        session.execute(update(AuditEvent).where(AuditEvent.id == third.id).values(outcome="8"))
    with sessions() as session:
        _, broken = audit.verify(session=session)
    assert broken is not None and broken.event_id == third.id and "edited" in broken.reason
    with sessions.begin() as session:
        session.execute(update(AuditEvent).where(AuditEvent.id == third.id).values(outcome="0"))
        session.query(AuditEvent).filter(AuditEvent.id == third.id + 1).delete()
    with sessions() as session:
        _, broken = audit.verify(session=session)
    assert broken is not None and broken.event_id == third.id + 2 and "removed" in broken.reason


def test_concurrent_appends_keep_one_chain(engine: Engine) -> None:
    sessions = db.make_session_factory(engine)
    principal = Principal(subject="tester")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                with sessions.begin() as session:
                    audit.append(
                        session=session,
                        principal=principal,
                        event_type="test",
                        action="C",
                        detail={"writer": n, "i": i},
                    )
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with sessions() as session:
        assert audit.verify(session=session) == (40, None)


def test_migrations_build_exactly_the_declared_tables(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.store.tables import Base

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_appends_roll_back_with_their_transaction(engine: Engine) -> None:
    """Several appends in one transaction chain to each other; a rolled-back one leaves neither row nor head."""
    sessions = db.make_session_factory(engine)
    principal = Principal(subject="tester")
    with sessions.begin() as session:
        for i in range(3):
            audit.append(session=session, principal=principal, event_type="test", action="C", detail={"i": i})
    with sessions() as session, session.begin():
        audit.append(session=session, principal=principal, event_type="test", action="C", detail={"lost": True})
        session.rollback()
    with sessions.begin() as session:
        audit.append(session=session, principal=principal, event_type="test", action="R", patient_ref="Patient/p")
    with sessions() as session:
        assert audit.verify(session=session) == (4, None)
        rows = session.query(AuditEvent).order_by(AuditEvent.id).all()
        assert [r.detail for r in rows] == [{"i": 0}, {"i": 1}, {"i": 2}, {}]
        assert rows[-1].patient_ref == "Patient/p" and rows[-1].prev_hash == rows[-2].hash


def test_an_append_is_one_statement_on_postgresql_and_chains_as_verify_does(engine: Engine) -> None:
    """PostgreSQL chains the event itself (sha256 of the last hash and the canonical content, in one statement);
    its hashes are the ones verify recomputes in Python, for content beyond ASCII too. SQLite takes three."""
    sessions = db.make_session_factory(engine)
    principal = Principal(subject="Zoë Ångström", role="clinician", source_address="10.0.0.7")
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _k, statement, *_: statements.append(statement))
    details = [{"name": "Müller, 日本", "p": 0.125, "nested": {"a": [1, None, True]}}, {}, {"quote": '"\\'}]
    for detail in details:
        with sessions.begin() as session:
            session.connection()  # BEGIN (and the pool's ping) before counting
            statements.clear()
            audit.append(
                session=session,
                principal=principal,
                event_type="test",
                action="R",
                entity_ref="study:1.2.3",
                patient_ref="Patient/é",
                detail=detail,
            )
            assert len(statements) == (1 if engine.dialect.name == "postgresql" else 3)
    with sessions() as session:
        assert audit.verify(session=session) == (3, None)
        rows = session.query(AuditEvent).order_by(AuditEvent.id).all()
        assert [r.detail for r in rows] == details
        assert rows[0].prev_hash == audit.GENESIS and rows[1].prev_hash == rows[0].hash
        assert rows[2].hash == audit._chain(rows[1].hash, audit._canonical(vars(rows[2])))
        assert session.get(AuditHead, 1).count == 3  # type: ignore[union-attr]


def test_an_append_without_the_head_row_fails_and_writes_nothing(engine: Engine) -> None:
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        session.execute(delete(AuditHead))
    with pytest.raises(RuntimeError, match="audit_head row is missing"), sessions.begin() as session:
        audit.append(session=session, principal=Principal(subject="t"), event_type="test", action="C")
    with sessions() as session:
        assert session.query(AuditEvent).count() == 0


def test_instance_whose_series_uid_belongs_to_another_study(engine: Engine) -> None:
    """A series belongs to one study. Before, an instance naming another study's series was filed under that
    series (shown, analyzed and reported with the other study) and its own study was left empty; now it is
    refused, whether its study is new (the series INSERT clashes) or known, and nothing of it is written."""
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        studies.add_instance(
            session=session,
            meta=_meta(study_instance_uid="1.2.5", series_instance_uid="1.2.5.1", sop_instance_uid="1.2.5.1.1"),
            blob_key="c",
            size_bytes=1,
            sha256="z",
        )
    for study_uid in ("1.2.4", "1.2.5"):  # a new study, then a known one
        with sessions() as session, pytest.raises(studies.SeriesOfAnotherStudy, match="another study"):
            studies.add_instance(
                session=session,
                meta=_meta(study_instance_uid=study_uid, sop_instance_uid=f"{study_uid}.9.9"),
                blob_key="b",
                size_bytes=1,
                sha256="y",
            )
    with sessions() as session:
        assert studies.get(session=session, study_instance_uid="1.2.4") is None
        assert session.query(Series).count() == 2 and session.query(Instance).count() == 2


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    built = db.make_engine(postgres_url)
    db.upgrade(built)
    yield built
    built.dispose()


def test_concurrent_first_instances_of_one_study(postgres_engine: Engine) -> None:
    """Two requests store the first instances of the same new study at once: one study, one series, both kept.

    PostgreSQL only: SQLite serializes writers with its database lock, so no two inserts of one study overlap there.
    """
    engine = postgres_engine
    sessions = db.make_session_factory(engine)
    first_added = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            first_added.wait(10)
            with sessions.begin() as session:  # its INSERT of the study waits for the first commit, then clashes
                _, new = studies.add_instance(
                    session=session, meta=_meta(sop_instance_uid="1.2.3.1.2"), blob_key="b", size_bytes=1, sha256="y"
                )
                assert new
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    with sessions.begin() as session:
        studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        first_added.set()
        thread.join(0.5)  # let the second request reach its INSERT while this transaction is still open
    thread.join()
    assert not errors
    with sessions() as session:
        assert session.query(Study).count() == 1 and session.query(Series).count() == 1
        assert session.query(Instance).count() == 2


def test_a_job_or_a_study_comes_with_its_patient_in_one_select(engine: Engine) -> None:
    """The workers' and the report read's loads: job + study + patient, study + patient (+ job states), one SELECT
    each; the patient then stays in the session, so the report's and the audit's reference to it costs none."""
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        patient = Patient(resource_id="p-1")
        session.add(patient)
        instance, _ = studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        linked = studies.study_of(session=session, instance=instance)
        session.flush()
        linked.patient_id = patient.id
        job, _ = jobs.get_or_create(session=session, study=linked, model_name="m", model_version="1")
        lone_instance, _ = studies.add_instance(
            session=session,
            meta=_meta(study_instance_uid="1.2.4", series_instance_uid="1.2.4.1", sop_instance_uid="1.2.4.1.1"),
            blob_key="b",
            size_bytes=1,
            sha256="y",
        )
        lone_job, _ = jobs.get_or_create(
            session=session,
            study=studies.study_of(session=session, instance=lone_instance),
            model_name="m",
            model_version="1",
        )
        job_id, lone_job_id, patient_id = job.id, lone_job.id, patient.id
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with sessions.begin() as session:
            found, study, held = jobs.get_with_study(session=session, job_id=job_id, for_update=True)
            assert (found.id, study.study_instance_uid, held is not None and held.id) == (job_id, "1.2.3", patient_id)
            assert clinical.patient_reference(session=session, patient_id=study.patient_id) == "Patient/p-1"
            assert len(statements) == 1, statements  # the reference came from the session
        statements.clear()
        with sessions.begin() as session:
            study, held, states = jobs.study_with_states(session=session, study_instance_uid="1.2.3")
            assert held is not None and held.resource_id == "p-1"
            assert (study.study_instance_uid, states) == ("1.2.3", ["queued"])
            assert clinical.patient_resource_id(session=session, patient_id=study.patient_id) == "p-1"
            study, held = studies.get_with_patient_or_raise(session=session, study_instance_uid="1.2.3")
            assert held is not None and held.resource_id == "p-1"
            assert len(statements) == 2, statements
        with sessions.begin() as session:  # a study joined to no patient
            found, study, held = jobs.get_with_study(session=session, job_id=lone_job_id)
            assert (found.id, study.study_instance_uid, held) == (lone_job_id, "1.2.4", None)
            assert studies.get_with_patient_or_raise(session=session, study_instance_uid="1.2.4")[1] is None
            for missing in (
                lambda: jobs.get_with_study(session=session, job_id="no-such-job"),
                lambda: jobs.study_with_states(session=session, study_instance_uid="9.9"),
                lambda: studies.get_with_patient_or_raise(session=session, study_instance_uid="9.9"),
            ):
                with pytest.raises(NotFound):
                    missing()
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_concurrent_requests_for_one_job(postgres_engine: Engine) -> None:
    """Two analyses of the same study x model version x revision at once: the second INSERT waits for the first
    commit, does nothing, and the second request gets the first job, created once."""
    sessions = db.make_session_factory(postgres_engine)
    with sessions.begin() as session:
        studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
    first_created = threading.Event()
    outcome: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            first_created.wait(10)
            with sessions.begin() as session:
                study = studies.get_or_raise(session=session, study_instance_uid="1.2.3")
                job, created = jobs.get_or_create(session=session, study=study, model_name="m", model_version="1")
                outcome.append((job.id, created))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    thread = threading.Thread(target=second)
    thread.start()
    with sessions.begin() as session:
        study = studies.get_or_raise(session=session, study_instance_uid="1.2.3")
        job, created = jobs.get_or_create(
            session=session, study=study, model_name="m", model_version="1", priority=2, timings={"enqueued": 1.0}
        )
        assert created and (job.priority, job.timings, job.state, job.revision) == (2, {"enqueued": 1.0}, "queued", 1)
        first_id = job.id
        first_created.set()
        thread.join(0.5)  # the second request's INSERT waits on this transaction's row
        assert not outcome
    thread.join()
    assert not errors and outcome == [(first_id, False)]
    with sessions() as session:
        assert session.query(Job).count() == 1


def test_a_job_advances_only_from_the_state_it_was_read_in(engine: Engine) -> None:
    """The preprocess stage hands a job to the infer stage in one conditional UPDATE: it takes effect while the job
    is still preprocessing, and a second delivery that finds it moved on changes nothing."""
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        studies.add_instance(session=session, meta=_meta(), blob_key="a", size_bytes=1, sha256="x")
        study = studies.get_or_raise(session=session, study_instance_uid="1.2.3")
        job, _ = jobs.get_or_create(session=session, study=study, model_name="m", model_version="1")
        job.state = JobState.preprocessing.value
        job_id, before = job.id, job.updated_at
    timings = {"enqueued_preprocess": 1.0, "preprocess_seconds": 0.5, "enqueued_infer": 2.0}
    moves = {"from_state": JobState.preprocessing, "state": JobState.inferring, "stage": JobStage.infer}
    with sessions.begin() as session:
        assert jobs.advance(session=session, job_id=job_id, timings=timings, **moves)  # type: ignore[arg-type]
    with sessions.begin() as session:
        assert not jobs.advance(session=session, job_id=job_id, timings={"lost": 1.0}, **moves)  # type: ignore[arg-type]
        assert not jobs.advance(session=session, job_id="no-such-job", timings={}, **moves)  # type: ignore[arg-type]
    with sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        assert (job.state, job.stage, job.timings) == ("inferring", "infer", timings)
        assert job.updated_at >= before


def test_observation_facts_are_upserted_without_a_select(engine: Engine) -> None:
    """New facts are inserted and a fact of a stored resource id replaced, in one statement (an executemany of
    INSERT ... ON CONFLICT DO UPDATE); of two facts of one resource id in a call, the last is kept."""
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        first, second = Patient(resource_id="p1"), Patient(resource_id="p2")
        session.add_all([first, second])
        session.flush()

        def fact(resource_id: str, value: float, status: str = "final") -> ObservationFact:
            return ObservationFact(
                resource_id=resource_id,
                patient_ref="Patient/p1",
                loinc="2160-0",
                value=value,
                ucum_unit="mg/dL",
                original_value=value,
                original_unit="mg/dL",
                effective_at=dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC),
                status=status,
            )

        clinical.put_observations(session=session, facts=[(first, fact("o1", 1.0)), (first, fact("o2", 2.0))])
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda _c, _k, statement, *_: statements.append(statement))
        clinical.put_observations(
            session=session,
            facts=[(second, fact("o1", 1.5, "amended")), (first, fact("o3", 3.0)), (first, fact("o3", 3.5))],
        )
        assert len(statements) == 1 and not statements[0].lstrip().upper().startswith("SELECT")
    with sessions() as session:
        rows = {row.resource_id: row for row in session.query(Observation)}
        assert {key: (row.value, row.status, row.patient_id) for key, row in rows.items()} == {
            "o1": (1.5, "amended", second.id),
            "o2": (2.0, "final", first.id),
            "o3": (3.5, "final", first.id),
        }
        assert rows["o1"].effective_at == dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)


def test_a_patient_and_its_identifier_rows_in_one_select(engine: Engine) -> None:
    """The Bundle's patient upsert looks for the patient of its resource id and for the stored rows of its
    identifiers in one SELECT; each row comes with its patient loaded."""
    sessions = db.make_session_factory(engine)
    with sessions.begin() as session:
        first, second = Patient(resource_id="r1"), Patient(resource_id="r2")
        session.add_all([first, second])
        session.flush()
        session.add_all(
            [
                PatientIdentifierRow(patient_id=first.id, system="s", value="a"),
                PatientIdentifierRow(patient_id=first.id, system="s", value="b"),
                PatientIdentifierRow(patient_id=second.id, system="s", value="c"),
            ]
        )
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _k, statement, *_: statements.append(statement))

    def ids(*values: str) -> list[PatientIdentifier]:
        return [PatientIdentifier(system="s", value=value) for value in values]

    with sessions() as session:
        statements.clear()
        patient, stored = clinical.patient_and_identifier_rows(
            session=session, resource_id="r1", identifiers=ids("a", "c", "z")
        )
        assert patient is not None and patient.resource_id == "r1"
        assert sorted(stored) == [("s", "a"), ("s", "c")]
        assert stored[("s", "c")].patient.resource_id == "r2" and stored[("s", "a")].patient is patient
        assert session.get(Patient, stored[("s", "c")].patient_id) is stored[("s", "c")].patient
        assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    with sessions() as session:
        patient, stored = clinical.patient_and_identifier_rows(session=session, resource_id="new", identifiers=ids("b"))
        assert patient is None and stored[("s", "b")].patient.resource_id == "r1"
        patient, stored = clinical.patient_and_identifier_rows(session=session, resource_id="r2", identifiers=[])
        assert patient is not None and patient.resource_id == "r2" and stored == {}
        assert clinical.patient_and_identifier_rows(session=session, resource_id="new", identifiers=ids("z")) == (
            None,
            {},
        )
