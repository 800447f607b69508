"""Duplicate and out-of-order deliveries never move a job backwards nor make a second report."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from service.errors import ServiceError
from service.flows import analysis, ingest, queue
from service.flows.runtime import Runtime
from service.inference import pipeline
from service.schemas import SYSTEM_PRINCIPAL, JobStage
from service.store import jobs
from service.store.tables import Report, Study
from tests.factories import dx_instance


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "send", lambda task, job_id, **kw: calls.append((task, job_id)))
    return calls


def _job(runtime: Runtime) -> str:
    study_uid = generate_uid()
    result = ingest.store_instance(
        runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    assert isinstance(result, ingest.StoredInstance)
    request = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
    )
    [job] = [j for j in request.jobs if j.model_name == "cxr-fusion"]
    return job.id


def _state(runtime: Runtime, job_id: str) -> tuple[str, str, int]:
    with runtime.sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        return job.state, job.stage, job.attempts


def test_duplicates_in_every_order(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    job_id = _job(runtime)
    assert sent == [(queue.PREPROCESS_TASK, job_id)]
    analysis.preprocess_job(runtime, job_id)
    assert _state(runtime, job_id) == ("inferring", "infer", 1)
    analysis.preprocess_job(runtime, job_id)  # duplicate: inputs are ready, nothing to do
    assert _state(runtime, job_id) == ("inferring", "infer", 1)
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[0] == "succeeded"
    analysis.preprocess_job(runtime, job_id)  # late duplicate of stage 1
    analysis.infer_job(runtime, job_id)  # duplicate of stage 2
    assert _state(runtime, job_id)[0] == "succeeded"
    with runtime.sessions() as session:
        assert session.scalar(select(func.count(Report.id))) == 1


def test_infer_without_inputs_goes_back_to_preprocess(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    job_id = _job(runtime)
    sent.clear()
    analysis.infer_job(runtime, job_id)  # arrives first (e.g. re-sent by the reconciler after the inputs were lost)
    assert _state(runtime, job_id)[:2] == ("queued", "preprocess")
    assert sent == [(queue.PREPROCESS_TASK, job_id)]
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[0] == "succeeded"


def test_damaged_inputs_go_back_to_preprocess(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    """The prepared inputs are not fsync'd: after a machine crash they may be empty; the job pre-processes again."""
    job_id = _job(runtime)
    analysis.preprocess_job(runtime, job_id)
    assert _state(runtime, job_id)[:2] == ("inferring", "infer")
    runtime.blobs.put_bytes(f"jobs/{job_id}/prepared", b"", durable=False)
    sent.clear()
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[:2] == ("queued", "preprocess")
    assert sent == [(queue.PREPROCESS_TASK, job_id)]
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[0] == "succeeded"


def test_inputs_of_another_shape_go_back_to_preprocess_and_never_reach_a_batch(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A well-formed blob with a 128x128 image (a changed manifest, a foreign writer): before, it joined a batch
    and failed every study in it ("all input arrays must have the same shape"). Now the infer stage refuses it and
    the job is pre-processed again, to the model's shape."""
    job_id = _job(runtime)
    analysis.warm_models(runtime)  # the batcher's warm-up batches made before the model calls are counted
    analysis.preprocess_job(runtime, job_id)
    key = f"jobs/{job_id}/prepared"
    prepared = pipeline.decode_prepared(runtime.blobs.read_bytes(key))
    wrong = dataclasses.replace(prepared, image=np.zeros((1, 128, 128), dtype=np.float32))
    runtime.blobs.put_bytes(key, pipeline.encode_prepared(wrong), durable=False)
    batched: list[int] = []
    real_predict = pipeline.predict

    def counted(manifest: Any, runner: Any, batch: list[pipeline.PreparedInputs]) -> Any:
        batched.append(len(batch))
        return real_predict(manifest, runner, batch)

    monkeypatch.setattr(pipeline, "predict", counted)
    sent.clear()
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[:2] == ("queued", "preprocess")
    assert sent == [(queue.PREPROCESS_TASK, job_id)] and batched == []
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[0] == "succeeded" and batched[0] == 1


def test_a_studys_job_states_follow_the_job(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    from service.errors import NotFound

    job_id = _job(runtime)
    with runtime.sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        study_uid = session.get(Study, job.study_id).study_instance_uid  # type: ignore[union-attr]
        assert jobs.study_with_states(session=session, study_instance_uid=study_uid)[2] == ["queued"]
        with pytest.raises(NotFound, match="not found"):
            jobs.study_with_states(session=session, study_instance_uid="1.2.999")
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    with runtime.sessions() as session:
        assert jobs.study_with_states(session=session, study_instance_uid=study_uid)[2] == ["succeeded"]
    other = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=other, size=64), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    with runtime.sessions() as session:
        assert jobs.study_with_states(session=session, study_instance_uid=other)[2] == []


def test_a_study_is_reported_once_every_job_has_succeeded(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    job_id = _job(runtime)
    with runtime.sessions.begin() as session:
        study = session.get(Study, jobs.get_or_raise(session=session, job_id=job_id).study_id)
        assert study is not None
        other, _ = jobs.get_or_create(session=session, study=study, model_name="other-model", model_version="1")
        other_id, study_id = other.id, study.id
    analysis.preprocess_job(runtime, job_id)
    analysis.infer_job(runtime, job_id)
    with runtime.sessions.begin() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.status != "reported"  # the other job has not run
        assert jobs.other_states(session=session, study=study, job_id=job_id) == [("other-model", "1", 1, "queued")]
        assert jobs.other_states(session=session, study=study, job_id=other_id) == [("cxr-fusion", "1", 1, "succeeded")]


def _two_jobs(runtime: Runtime) -> tuple[str, str, int]:
    """A chest radiograph's cxr-fusion job, and a job of the head CT model on the same study: it fails at
    pre-processing, as no instance of the study is a head CT."""
    job_id = _job(runtime)
    with runtime.sessions.begin() as session:
        study = session.get(Study, jobs.get_or_raise(session=session, job_id=job_id).study_id)
        assert study is not None
        ct, _ = jobs.get_or_create(session=session, study=study, model_name="ct-head-ich", model_version="1")
        return job_id, ct.id, study.id


def _study(runtime: Runtime, study_id: int) -> tuple[str, str | None]:
    with runtime.sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status, study.status_reason


@pytest.mark.parametrize("failing_first", [True, False])
def test_a_study_with_a_report_and_a_failed_job_is_reported(
    runtime: Runtime, sent: list[tuple[str, str]], failing_first: bool
) -> None:
    """The study of a model that succeeded and one that failed is no longer "analyzing" once both have finished,
    whichever finished last: it is reported, and its reason says that an analysis failed."""
    cxr_id, ct_id, study_id = _two_jobs(runtime)
    analysis.preprocess_job(runtime, cxr_id)
    if failing_first:
        analysis.preprocess_job(runtime, ct_id)
        assert _state(runtime, ct_id)[0] == "failed"
        assert _study(runtime, study_id)[0] == "analyzing"  # the chest radiograph's job still runs
    analysis.infer_job(runtime, cxr_id)
    if not failing_first:
        assert _study(runtime, study_id)[0] == "analyzing"
        analysis.preprocess_job(runtime, ct_id)
    assert _state(runtime, ct_id)[0] == "failed" and _state(runtime, cxr_id)[0] == "succeeded"
    assert _study(runtime, study_id) == ("reported", "1 of 2 analyses failed; see the study's jobs")


def test_a_study_whose_every_job_failed_has_failed(runtime: Runtime, sent: list[tuple[str, str]]) -> None:
    cxr_id, ct_id, study_id = _two_jobs(runtime)
    analysis.preprocess_job(runtime, ct_id)
    runtime.registry.models.pop("cxr-fusion")  # no longer served: its job fails too
    analysis.preprocess_job(runtime, cxr_id)
    assert _state(runtime, cxr_id)[0] == "failed"
    assert _study(runtime, study_id) == ("failed", "model cxr-fusion is no longer served")


def test_a_failed_revision_that_an_amendment_superseded_no_longer_counts(
    runtime: Runtime, sent: list[tuple[str, str]]
) -> None:
    """Revision 1 of the chest radiograph's job failed; revision 2 (new instances arrived) stored the report: the
    study is reported, with no failure in its reason."""
    first = _job(runtime)
    with runtime.sessions.begin() as session:
        job = jobs.get_or_raise(session=session, job_id=first)
        study = session.get(Study, job.study_id)
        assert study is not None
        second, _ = jobs.get_or_create(
            session=session,
            study=study,
            model_name="cxr-fusion",
            model_version="1",
            revision=2,
            rule=job.rule,
            sop_instance_uid=job.sop_instance_uid,
        )
        second_id, study_id = second.id, study.id
    served = runtime.registry.models.pop("cxr-fusion")
    analysis.preprocess_job(runtime, first)  # fails: the model is not served at that moment
    assert _state(runtime, first)[0] == "failed"
    assert _study(runtime, study_id)[0] == "analyzing"  # its second revision is still to run
    runtime.registry.models["cxr-fusion"] = served
    analysis.preprocess_job(runtime, second_id)
    analysis.infer_job(runtime, second_id)
    assert _state(runtime, second_id)[0] == "succeeded"
    assert _study(runtime, study_id)[0] == "reported"
    assert "failed" not in (_study(runtime, study_id)[1] or "")


def test_a_run_that_fails_the_job_while_another_run_infers_keeps_the_failure(
    runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one job's infer stage (the reconciler re-sent it): one fails the job (its batch's model call
    failed) while the other is post-processing. The failure recorded first stands. Before, the other run then
    stored a report and marked the job "succeeded" over the failure: a succeeded job with an error, a "reported"
    study with the failure as its reason, and both a job.failed and a report.create in the audit trail."""
    job_id = _job(runtime)
    analysis.preprocess_job(runtime, job_id)
    real_post_process = pipeline.post_process

    def fail_meanwhile(*args: Any, **kwargs: Any) -> Any:
        analysis._fail(runtime, job_id, JobStage.infer, ServiceError("model call failed", code="inference"))
        return real_post_process(*args, **kwargs)

    monkeypatch.setattr(pipeline, "post_process", fail_meanwhile)
    analysis.infer_job(runtime, job_id)
    assert _state(runtime, job_id)[0] == "failed"
    with runtime.sessions() as session:
        job = jobs.get_or_raise(session=session, job_id=job_id)
        assert session.scalar(select(func.count(Report.id)).where(Report.job_id == job_id)) == 0
        study = session.get(Study, job.study_id)
        assert study is not None and (study.status, study.status_reason) == ("failed", "model call failed")
    assert not runtime.blobs.exists(analysis.heatmap_key(job_id))
