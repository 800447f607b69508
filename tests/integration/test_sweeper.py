"""The sweeper's re-sending of lost jobs: one sweeper per job, and none while the job's queue has a backlog."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from service.flows import analysis, ingest, queue
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import jobs
from service.store.tables import Job, Study, utcnow
from tests.conftest import make_settings
from tests.factories import dx_instance, queued_job


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "send", lambda task, job_id, **kw: calls.append((task, job_id)))
    return calls


def _lost_job(runtime: Runtime, *, inferring: bool = False) -> str:
    """A queued job (its task lost with the broker), untouched for an hour."""
    _, job_id = queued_job(runtime)
    if inferring:
        analysis.preprocess_job(runtime, job_id)
    with runtime.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - dt.timedelta(hours=1)))
    return job_id


def test_two_sweepers_send_a_lost_job_again_once(
    any_runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker runs a sweeper. Before, each read the lost jobs without a lock and sent each one again: a job
    run twice, more load on a queue that was already slow. Now the first claims the job (PostgreSQL: its row
    locked, which the second skips; SQLite: an UPDATE that only the first makes) and the second leaves it."""
    runtime = any_runtime
    job_id = _lost_job(runtime)
    del sent[:]
    first_found, second_done = threading.Event(), threading.Event()
    real_lost = jobs.lost

    def lost_then_wait(**kwargs: Any) -> list[Job]:
        found = real_lost(**kwargs)
        if threading.current_thread().name == "first":
            first_found.set()
            second_done.wait(timeout=2)  # its transaction open while the second sweeps
        return found

    monkeypatch.setattr(jobs, "lost", lost_then_wait)
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            analysis.sweep(runtime)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)
        finally:
            if threading.current_thread().name == "second":
                second_done.set()

    first = threading.Thread(target=sweep, name="first")
    first.start()
    assert first_found.wait(30)
    second = threading.Thread(target=sweep, name="second")
    second.start()
    for thread in (first, second):
        thread.join(timeout=60)
    assert not errors
    assert sent == [(queue.PREPROCESS_TASK, job_id)]
    with runtime.sessions() as session:
        assert (jobs.get_or_raise(session=session, job_id=job_id).timings or {})["resent"] == 1


def test_a_job_whose_queue_has_a_backlog_is_not_sent_again(
    any_runtime: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job waiting behind a backlog has not moved for the reconcile period, but it is not lost: sending it again
    would only lengthen the backlog. A job of the other queue, which is empty, is sent again."""
    runtime = any_runtime
    inferring = _lost_job(runtime, inferring=True)
    queued = _lost_job(runtime)
    del sent[:]
    monkeypatch.setattr(analysis, "_queue_depths", lambda runtime: {queue.INFER_QUEUE: 40, queue.PREPROCESS_QUEUE: 0})
    analysis.sweep(runtime)
    assert sent == [(queue.PREPROCESS_TASK, queued)]
    monkeypatch.setattr(analysis, "_queue_depths", lambda runtime: {queue.INFER_QUEUE: 0, queue.PREPROCESS_QUEUE: 0})
    analysis.sweep(runtime)
    assert sent[1:] == [(queue.INFER_TASK, inferring)]


LATERAL_STUDIES = 101  # more than a round read before


def _lateral_views_wait(tmp_path: Path, *, stable_seconds: float) -> Runtime:
    """A runtime whose rules analyze a PA view at once and an AP view (a portable film, say) after ``stable_seconds`` of
    quiet. (Not a lateral view: cxr-fusion reads frontal views only.)"""
    rules = tmp_path / "routing.yaml"
    lateral = {"name": "ap", "match": {"ViewPosition": ["AP"]}, "stable_seconds": stable_seconds}
    pa = {"name": "pa", "match": {"ViewPosition": ["PA"]}, "stable_seconds": 0}
    rules.write_text(yaml.safe_dump({"rules": [{**rule, "models": ["cxr-fusion"]} for rule in (lateral, pa)]}))
    runtime = build_runtime(make_settings(tmp_path, routing_rules=rules, batching=False))
    set_runtime(runtime)
    return runtime


def _store_lateral_view(runtime: Runtime) -> str:
    """A new study of one AP chest view; its Study Instance UID."""
    lateral = pydicom.dcmread(io.BytesIO(dx_instance(size=256)))
    lateral.ViewPosition = "AP"
    ingest.store_instance(runtime, _saved(lateral), principal=SYSTEM_PRINCIPAL, part=1, protocol="test")
    return str(lateral.StudyInstanceUID)


def _saved(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_studies_waiting_for_their_rules_quiet_period_do_not_hide_a_due_study(
    tmp_path: Path, sent: list[tuple[str, str]]
) -> None:
    """Before, a round read the 100 oldest stable-looking studies only. A study whose rule asks for a longer quiet
    period is not stamped while it waits, so 100 of them (say lateral views held for an hour) came back first in
    every round and a study due now, received after them, was never analyzed until they were."""
    runtime = _lateral_views_wait(tmp_path, stable_seconds=3600)
    for _ in range(LATERAL_STUDIES):
        _store_lateral_view(runtime)
    due = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=due, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )

    analysis.sweep(runtime)
    with runtime.sessions() as session:
        rules_run = session.scalars(select(Job.rule).join(Study, Job.study_id == Study.id)).all()
        waiting = session.scalar(select(func.count(Study.id)).where(Study.analysis_requested_at.is_(None)))
    assert rules_run == ["pa"], rules_run
    assert waiting == LATERAL_STUDIES, "the AP views still wait for their quiet hour"


def test_a_study_waiting_for_its_rules_quiet_period_is_not_routed_again_until_it_is_due(
    tmp_path: Path, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Now that a round reads every waiting study, each would be locked and routed again every few seconds until
    its quiet period ends; the sweeper remembers when it is due instead (unless an instance arrives meanwhile)."""
    runtime = _lateral_views_wait(tmp_path, stable_seconds=3)
    analysis._NOT_DUE.clear()
    lateral_uid = _store_lateral_view(runtime)
    routed: list[str] = []
    real_request = analysis.request_analysis

    def counted(runtime: Runtime, *, study_instance_uid: str, **kwargs: Any) -> Any:
        routed.append(study_instance_uid)
        return real_request(runtime, study_instance_uid=study_instance_uid, **kwargs)

    monkeypatch.setattr(analysis, "request_analysis", counted)
    assert analysis.sweep(runtime) == (1, 0) and not sent, "routed once: its rule's 3 s are not over"
    assert analysis.sweep(runtime) == (0, 0) and routed == [lateral_uid]
    time.sleep(3.2)
    assert analysis.sweep(runtime) == (1, 0)
    with runtime.sessions() as session:
        assert session.scalars(select(Job.rule)).all() == ["ap"]


def test_an_amendment_waiting_on_a_running_analysis_is_not_held_back_by_another_routes_quiet_period(
    tmp_path: Path, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study routed to two models: the first's amendment waits for its running job (due as soon as that ends),
    the second (sorted after it) for an hour of quiet. The remembered due time must be the first's, not the
    hour."""
    rules = tmp_path / "routing.yaml"  # the last instance is read: the second one amends
    rules.write_text("rules:\n  - {name: chest, match: {Modality: [DX]}, models: [cxr-fusion], instance: last}\n")
    runtime = build_runtime(make_settings(tmp_path, batching=False, study_stable_seconds=0, routing_rules=rules))
    set_runtime(runtime)
    analysis._NOT_DUE.clear()
    study, series = generate_uid(), generate_uid()
    for number in (1, 2):
        if number == 2:
            assert analysis.sweep(runtime) == (1, 0)  # job 1 made, queued
        part = dx_instance(study_uid=study, series_uid=series, size=256, seed=number, instance_number=number)
        ingest.store_instance(runtime, part, principal=SYSTEM_PRINCIPAL, part=1, protocol="test")
    real_route_study = type(runtime.routing).route_study

    def with_a_slow_second_model(self: Any, manifests: Any, attributes: Any) -> Any:
        routing = real_route_study(self, manifests, attributes)
        slow = dataclasses.replace(routing.routes[0], model_name="zz-slow", rule="slow", stable_seconds=3600)
        routing.routes.append(slow)
        return routing

    monkeypatch.setattr(type(runtime.routing), "route_study", with_a_slow_second_model)
    analysis.sweep(runtime)  # job 1 still queued: the amendment waits
    assert analysis._NOT_DUE == {}, "due again as soon as job 1 ends"
    with runtime.sessions.begin() as session:
        session.execute(update(Job).values(state="succeeded"))
    analysis.sweep(runtime)
    with runtime.sessions() as session:
        assert session.scalars(select(Job.revision).order_by(Job.revision)).all() == [1, 2]
