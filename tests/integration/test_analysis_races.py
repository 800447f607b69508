"""An instance stored while an analysis of its study is being requested, in two transactions on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from service.flows import analysis, ingest, orders, queue
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store import jobs, studies
from service.store.tables import utcnow
from tests.conftest import make_settings
from tests.factories import dx_instance


@pytest.fixture
def pg_runtime(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setattr(queue, "send", lambda *args, **kwargs: None)  # the jobs stay queued
    runtime = build_runtime(make_settings(tmp_path, database_url=postgres_url, batching=False))
    set_runtime(runtime)
    yield runtime
    runtime.engine.dispose()


@pytest.mark.parametrize("first", ["instance", "request"])
def test_an_instance_stored_during_an_analysis_request_is_analyzed(
    pg_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """A second radiograph of a study is stored while an explicit analysis request for that study runs. ``first``
    names the transaction that gets ahead: it waits (up to 1 s) for the other to have gone as far as it can before
    it commits. Either the request sees the new instance, or the study stays due for analysis and the instance
    counts as newer than the job (so that the sweeper amends the report).

    Before, with the instance first: its transaction had taken its timestamp and not committed; the request,
    later, did not see the instance and stamped the study "analysis requested" after it, so the study was never
    due again and the new radiograph was never analyzed."""
    runtime = pg_runtime
    study_uid = generate_uid()
    ingest.store_instance(
        runtime, dx_instance(study_uid=study_uid, size=256), principal=SYSTEM_PRINCIPAL, part=1, protocol="test"
    )
    second = dx_instance(study_uid=study_uid, size=256, seed=2, instance_number=2)
    added, read = threading.Event(), threading.Event()
    seen: list[int] = []
    real_order_for_new_study, real_instances_of = orders.order_for_new_study, studies.instances_of

    def order_then_wait(session: Any, study: Any) -> None:  # in the instance's transaction, after its rows
        real_order_for_new_study(session, study)
        added.set()
        if first == "instance":
            read.wait(timeout=1)

    def instances_then_wait(**kwargs: Any) -> Any:  # in the request's transaction
        pairs = real_instances_of(**kwargs)
        seen.append(len(pairs))
        read.set()
        if first == "request":
            added.wait(timeout=1)
        return pairs

    monkeypatch.setattr(orders, "order_for_new_study", order_then_wait)
    monkeypatch.setattr(studies, "instances_of", instances_then_wait)
    errors: list[BaseException] = []

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    store = threading.Thread(
        target=run,
        args=(lambda: ingest.store_instance(runtime, second, principal=SYSTEM_PRINCIPAL, part=1, protocol="test"),),
    )
    request = threading.Thread(
        target=run,
        args=(
            lambda: analysis.request_analysis(
                runtime, study_instance_uid=study_uid, principal=SYSTEM_PRINCIPAL, trigger="request"
            ),
        ),
    )
    leader, follower = (store, request) if first == "instance" else (request, store)
    leader.start()
    assert (added if first == "instance" else read).wait(30)
    follower.start()
    for thread in (leader, follower):
        thread.join(timeout=60)
    assert not errors
    assert len(seen) == 1
    with runtime.sessions() as session:
        study = studies.get_or_raise(session=session, study_instance_uid=study_uid)
        [job] = jobs.for_study(session=session, study=study)
        pairs = real_instances_of(session=session, study=study)
        newest = max(instance.received_at for _, instance in pairs)
        due = [s.id for s in studies.stable_unanalyzed(session=session, stable_before=utcnow() + dt.timedelta(1))]
        assert len(pairs) == 2
        if first == "instance":
            assert seen == [2]  # the request waited for the instance's transaction, and saw it
            assert newest <= job.created_at and study.id not in due
        else:
            assert seen == [1]  # the instance waited for the request's transaction
            assert newest > job.created_at and study.id in due
