"""The DICOM results of a report version on PostgreSQL, when an amendment or a second run of the same publication
commits while a publication is under way."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.errors import TransientError
from service.flows import analysis, queue, results
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import Findings
from service.store import jobs, reports
from service.store.tables import AuditEvent, Delivery, Report, ReportVersion, utcnow
from tests.conftest import make_settings
from tests.factories import reported_job_id


@pytest.fixture
def pg_runtime(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)  # the stages are called here
    runtime = build_runtime(make_settings(tmp_path, database_url=postgres_url, batching=False))
    set_runtime(runtime)
    yield runtime
    runtime.engine.dispose()


def _reported_job(runtime: Runtime) -> tuple[str, str]:
    """(job id, report id) of a chest radiograph analyzed, its report's DICOM results still to make."""
    job_id = reported_job_id(runtime)
    with runtime.sessions() as session:
        report = session.scalar(select(Report).where(Report.job_id == job_id))
        assert report is not None and (report.version, report.dicom_state) == (1, "pending")
        return job_id, report.id


def _second_revision(runtime: Runtime, first_job: str) -> tuple[str, Findings]:
    """(a second revision of the job, queued, the findings of the first's report) for an amendment."""
    with runtime.sessions.begin() as session:
        job, study, _ = jobs.get_with_study(session=session, job_id=first_job)
        second, _ = jobs.get_or_create(
            session=session,
            study=study,
            model_name=job.model_name,
            model_version=job.model_version,
            revision=2,
            rule=job.rule,
            sop_instance_uid=job.sop_instance_uid,
        )
        findings = Findings.model_validate(
            session.scalar(select(ReportVersion.findings).where(ReportVersion.job_id == first_job))
        )
        return second.id, findings


def _report(runtime: Runtime, report_id: str) -> Report:
    with runtime.sessions() as session:
        report = session.get(Report, report_id)
        assert report is not None
        session.expunge(report)
        return report


def _dicom_events(runtime: Runtime, report_id: str) -> int:
    with runtime.sessions() as session:
        return int(
            session.scalar(
                select(func.count(AuditEvent.id)).where(
                    AuditEvent.event_type == "report.dicom", AuditEvent.entity_ref == f"report:{report_id}"
                )
            )
            or 0
        )


def test_an_amendment_committed_during_a_publication_keeps_its_own_results_to_make(
    pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1's publication reads the report while an amendment (version 2) holds it, uncommitted; the amendment
    commits while the publication stores its SR. The publication must then leave the report alone: version 2 stays
    "pending" and its own publication makes its SR. Before, version 1's UPDATE waited for the amendment's lock and
    then wrote "stored" with version 1's SR over version 2, whose results were then never made."""
    runtime = pg_runtime
    first_job, report_id = _reported_job(runtime)
    second_job, findings = _second_revision(runtime, first_job)

    amended, commit = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def amend() -> None:
        try:
            with runtime.sessions.begin() as session:
                job, study, _ = jobs.get_with_study(session=session, job_id=second_job, for_update=True)
                report, created = reports.create_once(
                    session=session, job=job, study=study, findings=findings, dicom_requested_at=utcnow()
                )
                assert created and report.version == 2
                session.flush()
                amended.set()
                assert commit.wait(30)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)
            amended.set()

    stored = 0
    real_store = results._store_result

    def store_then_let_the_amendment_commit(runtime: Runtime, data: bytes) -> None:
        nonlocal stored
        real_store(runtime, data)
        stored += 1
        if stored == 2:  # the SR and the heatmap are stored: the publication goes on to record them
            threading.Timer(0.5, commit.set).start()

    monkeypatch.setattr(results, "_store_result", store_then_let_the_amendment_commit)
    amender = threading.Thread(target=amend)
    amender.start()
    assert amended.wait(30)
    results.publish_results(runtime, first_job)
    commit.set()
    amender.join(timeout=30)
    assert not errors
    report = _report(runtime, report_id)
    assert (report.version, report.dicom_state, report.sr_sop_instance_uid) == (2, "pending", None)

    monkeypatch.setattr(results, "_store_result", real_store)
    results.publish_results(runtime, second_job)
    report = _report(runtime, report_id)
    assert report.dicom_state == "stored"
    assert report.sr_sop_instance_uid == results.result_uids(report_id, 2).sr


def test_two_runs_of_one_publication_at_once_record_its_results_once(
    pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-sent publication task runs while the first is under way (both read the report "pending"): the results
    are recorded once, by the first to finish, and the second neither overwrites them nor audits them again."""
    runtime = pg_runtime
    job_id, report_id = _reported_job(runtime)
    both_started = threading.Barrier(2, timeout=30)
    real_store = results._store_result
    calls = threading.local()

    def store_once_both_have_read(runtime: Runtime, data: bytes) -> None:
        if not getattr(calls, "waited", False):
            calls.waited = True
            both_started.wait()  # each has read the report as pending before either stores anything
        real_store(runtime, data)

    monkeypatch.setattr(results, "_store_result", store_once_both_have_read)
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            results.publish_results(runtime, job_id)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    runs = [threading.Thread(target=publish) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert not errors
    report = _report(runtime, report_id)
    uids = results.result_uids(report_id, 1)
    assert (report.dicom_state, report.sr_sop_instance_uid) == ("stored", uids.sr)
    assert report.heatmap_sop_instance_uid == uids.heatmap and report.dicom_error is None
    assert _dicom_events(runtime, report_id) == 1


def test_a_sweeper_skips_the_pushes_another_sweeper_is_resending(
    pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers' sweepers at once: a due push that one of them holds (it is setting its next try) is left to it,
    not sent a second time by the other."""
    runtime = pg_runtime
    _, report_id = _reported_job(runtime)
    with runtime.sessions.begin() as session:
        for name in ("held", "free"):
            session.add(
                Delivery(
                    id=name,
                    report_id=report_id,
                    report_version=1,
                    destination=name,
                    state="pending",
                    attempts=1,
                    next_attempt_at=utcnow() - dt.timedelta(seconds=1),
                )
            )
    sent: list[str] = []
    monkeypatch.setattr(queue, "send", lambda task, row_id, **kwargs: sent.append(row_id))
    swept: list[tuple[int, int]] = []
    with runtime.sessions.begin() as other_sweeper:
        other_sweeper.get(Delivery, "held", with_for_update=True)
        sweeper = threading.Thread(target=lambda: swept.append(results.sweep_results(runtime)))
        sweeper.start()
        sweeper.join(timeout=20)
        finished = not sweeper.is_alive()
    sweeper.join(timeout=20)
    assert finished, "the sweeper waited for the row the other sweeper holds"
    assert swept == [(0, 1)] and sent == ["free"]


def test_an_amendment_s_sr_stored_before_its_predecessor_s_is_kept_on_a_retry(
    pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1's publication is under way when the amendment (version 2) commits. Version 2's publication stores
    its SR (no predecessor: version 1's SR is not stored yet) and then fails for a while on its heatmap; version 1's
    publication then stores its SR (and records nothing: it is superseded). The retry of version 2's publication
    must keep the SR it stored. Before, it built the SR again, now naming version 1's as its predecessor: other
    bytes under the same UID, refused, and version 2's results failed for good."""
    runtime = pg_runtime
    first_job, report_id = _reported_job(runtime)
    second_job, findings = _second_revision(runtime, first_job)
    heatmap = runtime.blobs.read_bytes(analysis.heatmap_key(first_job))
    runtime.blobs.put_bytes(analysis.heatmap_key(second_job), heatmap)  # as its inference would have left it
    real_store = results._store_result
    calls: list[str] = []

    def store(runtime: Runtime, data: bytes) -> None:
        calls.append("store")
        if len(calls) == 1:  # version 1's SR, about to be stored: the amendment commits, its publication runs
            with runtime.sessions.begin() as session:
                job, study, _ = jobs.get_with_study(session=session, job_id=second_job, for_update=True)
                report, created = reports.create_once(
                    session=session, job=job, study=study, findings=findings, dicom_requested_at=utcnow()
                )
                assert created and report.version == 2
            with pytest.raises(TransientError):
                results.publish_results(runtime, second_job)
        elif len(calls) == 3:  # version 2's heatmap: the file system is gone for a while
            raise TransientError("storing a DICOM result failed: the disk is full")
        real_store(runtime, data)

    monkeypatch.setattr(results, "_store_result", store)
    results.publish_results(runtime, first_job)  # version 1: stores its SR and heatmap, records nothing
    assert len(calls) == 4  # version 1: SR, heatmap; version 2: SR, heatmap (failed)
    assert _report(runtime, report_id).dicom_state == "pending"
    monkeypatch.setattr(results, "_store_result", real_store)
    results.publish_results(runtime, second_job)  # the retry
    report = _report(runtime, report_id)
    assert (report.version, report.dicom_state, report.dicom_error) == (2, "stored", None)
    assert report.sr_sop_instance_uid == results.result_uids(report_id, 2).sr
