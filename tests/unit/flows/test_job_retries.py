"""A stage that meets a database or disk error is tried again, within a bound; a failed analysis runs again when
asked for."""

from __future__ import annotations

import datetime as dt
import errno
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from service.errors import ServiceError, TransientError
from service.flows import analysis, ingest, queue
from service.flows.runtime import Runtime
from service.ingest import dicom
from service.schemas import SYSTEM_PRINCIPAL, JobStage
from service.store import jobs
from service.store.tables import Job, Report, Study, utcnow
from service.worker import tasks
from tests.factories import dx_instance, queued_job


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "send", lambda task, job_id, **kw: calls.append((task, job_id)))
    return calls


def _job(runtime: Runtime, job_id: str) -> tuple[str, str | None]:
    with runtime.sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        return job.state, job.error_code


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT ...", {}, Exception("server closed the connection unexpectedly")),
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["database", "io", "disk-full"],
)
def test_a_database_or_disk_error_in_a_stage_is_tried_again(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Before, any such error failed the job for good (code "internal"), and nothing could run it again."""
    _, job_id = queued_job(runtime)
    real_decode = dicom.decode_image

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(dicom, "decode_image", unavailable)
    with pytest.raises(TransientError):  # Celery tries the task again, with back-off
        tasks._run(JobStage.preprocess, job_id)
    assert _job(runtime, job_id) == ("preprocessing", "transient")  # why it waits, for GET /v1/jobs/{id}
    monkeypatch.setattr(dicom, "decode_image", real_decode)
    tasks._run(JobStage.preprocess, job_id)
    tasks._run(JobStage.infer, job_id)
    assert _job(runtime, job_id) == ("succeeded", None)


def test_a_file_that_is_gone_fails_the_job(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, job_id = queued_job(runtime)

    def gone(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(dicom, "decode_image", gone)
    tasks._run(JobStage.preprocess, job_id)
    assert _job(runtime, job_id) == ("failed", "internal")


def test_an_explicit_request_runs_a_failed_analysis_again(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    """A failed analysis was final: a request, or the sweeper, returned the failed job. Now a request makes a new
    revision of the job and runs it; the sweeper still leaves a failed analysis alone."""
    study_uid, job_id = queued_job(runtime)
    analysis._fail(runtime, job_id, JobStage.preprocess, ServiceError("decoding failed", code="decode"))
    runtime.settings.study_stable_seconds = 0  # due for the sweeper at once
    sent_before = len(sent)
    stable = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="stable"
    )
    assert [job.id for job in stable.jobs] == [job_id] and len(sent) == sent_before
    again = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
    )
    [retry] = again.jobs
    assert retry.id != job_id and retry.revision == 2 and again.status == "analyzing"
    assert sent[-1] == (queue.PREPROCESS_TASK, retry.id)
    analysis.preprocess_job(runtime, retry.id)
    analysis.infer_job(runtime, retry.id)
    with runtime.sessions() as session:
        assert session.scalar(select(Report.job_id).join(Job, Report.job_id == Job.id).where(Job.id == retry.id))
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None and (study.status, study.status_reason) == ("reported", None)


def test_a_job_that_fails_leaves_no_inputs_derived_from_the_patient(
    runtime: Runtime, sent: list[tuple[str, str]]
) -> None:
    _, job_id = queued_job(runtime)
    analysis.preprocess_job(runtime, job_id)
    assert runtime.blobs.exists(analysis._inputs_key(job_id))
    analysis._fail(runtime, job_id, JobStage.infer, ServiceError("model call failed", code="inference"))
    assert not runtime.blobs.exists(analysis._inputs_key(job_id))


def test_one_study_whose_analysis_raises_does_not_stop_the_sweep(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, only a refusal was caught: any other error from one stable study ended the sweep's round, so the
    studies after it and the lost jobs waited for the next round, and met the same study first again."""
    runtime.settings.study_stable_seconds = 0
    first, second = generate_uid(), generate_uid()
    for study_uid in (first, second):
        ingest.store_instance(
            runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
        )
    real_request = analysis.request_analysis

    def deadlocked(runtime: Runtime, *, study_instance_uid: str, **kwargs: Any) -> Any:
        if study_instance_uid == first:
            raise OperationalError("SELECT ... FOR UPDATE", {}, Exception("deadlock detected"))
        return real_request(runtime, study_instance_uid=study_instance_uid, **kwargs)

    monkeypatch.setattr(analysis, "request_analysis", deadlocked)
    assert analysis.sweep(runtime)[0] == 2
    with runtime.sessions() as session:
        analyzed = session.scalar(select(Study.analysis_requested_at).where(Study.study_instance_uid == second))
    assert analyzed is not None


RETRIES_EXHAUSTED = "retries-exhausted"  # a stable error code: clients and alerts match on it


def _untouched_for_an_hour(runtime: Runtime, job_id: str) -> None:
    """As the row of a job whose last try Celery gave up on an hour ago (its message acknowledged) looks."""
    with runtime.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - dt.timedelta(hours=1)))


def _row(runtime: Runtime, job_id: str) -> tuple[str, str, str | None, str | None]:
    with runtime.sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        return job.state, job.stage, job.error_code, job.error_message


def _failures(stage: str, code: str) -> float:
    labels = {"model": "cxr-fusion", "stage": stage, "code": code}
    return REGISTRY.get_sample_value("clinfer_job_failures_total", labels) or 0.0


@pytest.mark.parametrize("stage", [JobStage.preprocess, JobStage.infer])
def test_a_stage_that_keeps_failing_for_a_moment_fails_the_job_after_the_bound_of_re_sends(
    any_runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch, stage: JobStage
) -> None:
    """Before, once Celery's retries ran out the job stayed active, the reconciler sent it again every period for
    ever (seen: a full blob volume, 35 attempts, 5 re-sends, no error recorded, still "preprocessing"). Now each
    try notes its transient error on the job, and the reconciler gives the job up after CLINFER_JOB_MAX_RESENDS
    re-sends: failed, with its stage, a stable code and the last error, and counted in clinfer_job_failures_total."""
    runtime = any_runtime  # on PostgreSQL too: the sweeper claims the job, then fails it in a transaction of its own
    runtime.settings.job_max_resends = 2
    _, job_id = queued_job(runtime)
    task = queue.PREPROCESS_TASK if stage == JobStage.preprocess else queue.INFER_TASK
    if stage == JobStage.infer:
        analysis.preprocess_job(runtime, job_id)
    state = "preprocessing" if stage == JobStage.preprocess else "inferring"

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    # the blob volume is full: the preprocess stage cannot write the prepared inputs, the infer stage the heatmap
    monkeypatch.setattr(runtime.blobs, "put_bytes", disk_full)
    failures_before = _failures(stage.value, RETRIES_EXHAUSTED)
    for resend in range(1, 3):
        with pytest.raises(TransientError):  # Celery's last try of this delivery
            tasks._run(stage, job_id)
        assert _row(runtime, job_id) == (
            state,
            stage.value,
            "transient",
            f"OSError in {stage.value}: No space left on device",
        )
        _untouched_for_an_hour(runtime, job_id)
        del sent[:]
        assert analysis.sweep(runtime)[1] == 1
        assert sent == [(task, job_id)]  # not given up before the bound
        with runtime.sessions() as session:
            assert (jobs.get_or_raise(session=session, job_id=job_id).timings or {})["resent"] == resend

    with pytest.raises(TransientError):
        tasks._run(stage, job_id)
    _untouched_for_an_hour(runtime, job_id)
    del sent[:]
    assert analysis.sweep(runtime)[1] == 0
    assert sent == []
    job_state, job_stage, code, message = _row(runtime, job_id)
    assert (job_state, job_stage, code) == ("failed", stage.value, RETRIES_EXHAUSTED)
    assert message == (
        f"the {stage.value} stage did not finish after 2 re-sends;"
        f" last error: OSError in {stage.value}: No space left on device"
    )
    assert _failures(stage.value, RETRIES_EXHAUSTED) == failures_before + 1


def test_a_lost_job_is_neither_sent_again_nor_counted_while_the_broker_cannot_be_read(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker outage longer than the bound's re-sends must not fail every job that waited through it."""
    runtime.settings.job_max_resends = 1
    _, job_id = queued_job(runtime)
    unreadable = dict.fromkeys((queue.PREPROCESS_QUEUE, queue.INFER_QUEUE, queue.RESULTS_QUEUE))
    monkeypatch.setattr(analysis, "_queue_depths", lambda runtime: unreadable)
    del sent[:]
    for _ in range(3):
        _untouched_for_an_hour(runtime, job_id)
        assert analysis.sweep(runtime)[1] == 0
    assert sent == [] and _row(runtime, job_id)[0] == "queued"
    monkeypatch.setattr(analysis, "_queue_depths", lambda runtime: dict.fromkeys(unreadable, 0))
    assert analysis.sweep(runtime)[1] == 1
    assert sent == [(queue.PREPROCESS_TASK, job_id)]
