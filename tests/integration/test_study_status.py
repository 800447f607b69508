"""A study's status on PostgreSQL when its last two jobs finish at the same moment, in two transactions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.flows import analysis, ingest, queue
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import jobs
from service.store.tables import Study
from tests.conftest import make_settings
from tests.factories import dx_instance


@pytest.fixture
def pg_runtime(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)  # the stages are called here, in threads
    runtime = build_runtime(make_settings(tmp_path, database_url=postgres_url, batching=False))
    set_runtime(runtime)
    yield runtime
    runtime.engine.dispose()


def test_two_jobs_finishing_at_once_settle_the_study(pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chest radiograph's job stores its report while the head CT model's job of the same study fails, each in
    its own transaction. Each reads the other job's state and then waits (up to 2 s) for the other to have read
    too before it commits: without the study's row lock both read the other still running and neither settles the
    study, which stays "analyzing" for ever; with it, the second reads after the first has committed."""
    runtime = pg_runtime
    study_uid = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    request = analysis.request_analysis(
        runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
    )
    [cxr] = request.jobs
    with runtime.sessions.begin() as session:
        study = session.get(Study, cxr.study_id)
        assert study is not None
        ct, _ = jobs.get_or_create(session=session, study=study, model_name="ct-head-ich", model_version="1")
        ct_id, study_id = ct.id, study.id
    analysis.preprocess_job(runtime, cxr.id)  # its inputs ready; the infer stage below stores the report

    read = threading.Condition()
    readers: list[str] = []
    real_other_states = jobs.other_states

    def other_states_then_wait(**kwargs: object) -> list[tuple[str, str, int, str]]:
        states = real_other_states(**kwargs)  # type: ignore[arg-type]
        with read:
            readers.append(str(kwargs["job_id"]))
            read.notify_all()
            read.wait_for(lambda: len(readers) >= 2, timeout=2)
        return states

    monkeypatch.setattr(jobs, "other_states", other_states_then_wait)
    errors: list[BaseException] = []

    def run(stage: object, job_id: str) -> None:
        try:
            stage(runtime, job_id)  # type: ignore[operator]
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(analysis.infer_job, cxr.id)),
        threading.Thread(target=run, args=(analysis.preprocess_job, ct_id)),  # no head CT here: it fails
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(readers) == sorted([cxr.id, ct_id])
    with runtime.sessions() as session:
        assert jobs.get_or_raise(session=session, job_id=cxr.id).state == "succeeded"
        assert jobs.get_or_raise(session=session, job_id=ct_id).state == "failed"
        study = session.get(Study, study_id)
        assert study is not None
        assert (study.status, study.status_reason) == ("reported", "1 of 2 analyses failed; see the study's jobs")
