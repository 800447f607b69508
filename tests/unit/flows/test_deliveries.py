"""One push of a report's DICOM results: its outcome is recorded once, by the latest try, and every way a try can end
leaves the delivery in a final state or with a next try scheduled, never pending for ever."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.errors import InvalidInput, TransientError
from service.flows import queue, results
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.schemas import SYSTEM_PRINCIPAL
from service.store.tables import AuditEvent, Delivery, Report
from tests.conftest import free_port, make_settings
from tests.factories import reported_job_id


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(queue, "send", lambda task, row_id, **kw: calls.append((task, row_id)))
    return calls


@pytest.fixture
def pushing(tmp_path: Path) -> Runtime:
    rules = tmp_path / "routing.yaml"
    rules.write_text(
        f"""
destinations:
  unit-archive: {{kind: dimse, host: 127.0.0.1, port: {free_port()}, ae_title: PACS}}
rules:
  - {{name: chest, match: {{Modality: [DX]}}, models: [cxr-fusion], destinations: [unit-archive]}}
"""
    )
    runtime = build_runtime(make_settings(tmp_path, routing_rules=rules, batching=False, delivery_max_attempts=3))
    set_runtime(runtime)
    return runtime


class _Destination:
    def __init__(self, send: Callable[[list[bytes]], None]) -> None:
        self.send = send


def _delivery(runtime: Runtime, sent: list[tuple[str, str]]) -> str:
    """A chest radiograph analyzed and its results stored: the id of its pending push to "unit-archive" (not
    "pacs": the e2e tests count that destination's pushes in the process-wide metrics)."""
    job_id = reported_job_id(runtime)
    results.publish_results(runtime, job_id)
    [delivery_id] = [row_id for task, row_id in sent if task == queue.DELIVER_TASK]
    return delivery_id


def _row(runtime: Runtime, delivery_id: str) -> tuple[str, int, str | None]:
    with runtime.sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        return delivery.state, delivery.attempts, delivery.last_error


def _push_events(runtime: Runtime) -> list[str]:
    with runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent.outcome).where(AuditEvent.event_type == "report.push")))


def test_an_unexpected_error_fails_the_push_visibly(
    pushing: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is neither a refusal nor transient (a fault in a transport library) fails the push, audited,
    instead of leaving it pending, re-sent every reconcile period with no end."""
    delivery_id = _delivery(pushing, sent)

    def broken(_: list[bytes]) -> None:
        raise KeyError("a transport library's own fault")

    monkeypatch.setattr(results, "destination_for", lambda name, spec: _Destination(broken))
    results.deliver(pushing, delivery_id)
    state, attempts, error = _row(pushing, delivery_id)
    assert (state, attempts) == ("failed", 1)
    assert error is not None and "internal error (KeyError" in error
    assert _push_events(pushing) == ["8"]


def test_a_late_try_leaves_the_outcome_to_the_try_that_claimed_the_push_after_it(
    pushing: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A try outlives the reconcile period, so the sweeper re-sends the push: the second try claims it and delivers
    while the first is still sending; the first then fails transiently. The push stays delivered, audited once."""
    delivery_id = _delivery(pushing, sent)
    tries: list[int] = []

    def send(_: list[bytes]) -> None:
        tries.append(len(tries) + 1)
        if tries == [1]:
            results.deliver(pushing, delivery_id)  # the re-sent try, run to its end meanwhile
            raise TransientError("association aborted")

    monkeypatch.setattr(results, "destination_for", lambda name, spec: _Destination(send))
    results.deliver(pushing, delivery_id)
    assert tries == [1, 2]
    assert _row(pushing, delivery_id) == ("delivered", 2, None)
    assert _push_events(pushing) == ["0"]


def test_a_push_whose_tries_ended_with_their_worker_fails_once_they_are_used_up(
    pushing: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try is counted when it claims the push; a worker that dies while sending records nothing. Once the
    tries are used up that way, the next claim fails the push, audited, without sending again."""
    delivery_id = _delivery(pushing, sent)
    with pushing.sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        delivery.attempts = 3  # three claims, none of which recorded an outcome
    sends: list[int] = []
    monkeypatch.setattr(results, "destination_for", lambda name, spec: _Destination(lambda _: sends.append(1)))
    results.deliver(pushing, delivery_id)
    state, attempts, error = _row(pushing, delivery_id)
    assert (state, attempts, sends) == ("failed", 3, [])
    assert error is not None and "no outcome was recorded" in error
    assert _push_events(pushing) == ["8"]
    with pushing.sessions() as session:
        assert session.scalar(select(func.count(Delivery.id)).where(Delivery.state == "pending")) == 0


def test_the_back_off_doubles_up_to_its_maximum(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, delivery_retry_seconds=10, delivery_retry_max_seconds=900)
    waits = [results.retry_delay(settings, attempts).total_seconds() for attempts in (1, 2, 3, 7, 8, 9, 100, 10_000)]
    assert waits == [10, 20, 40, 640, 900, 900, 900, 900]


def test_a_failed_push_of_a_version_since_amended_is_not_sent_again_nor_to_an_unknown_destination(
    pushing: Runtime, sent: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery_id = _delivery(pushing, sent)

    def refused(_: list[bytes]) -> None:
        raise TransientError("association rejected")

    monkeypatch.setattr(results, "destination_for", lambda name, spec: _Destination(refused))
    for _ in range(3):
        results.deliver(pushing, delivery_id)
    assert _row(pushing, delivery_id)[0] == "failed"
    with pushing.sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        report = session.get(Report, delivery.report_id)
        assert report is not None
        report.version += 1  # amended meanwhile: its new version has a push of its own
    assert results.retry_failed_deliveries(pushing, principal=SYSTEM_PRINCIPAL) == []
    with pushing.sessions.begin() as session:
        report = session.get(Report, delivery.report_id)
        assert report is not None
        report.version -= 1
    with pytest.raises(InvalidInput, match="unit-archive"):
        results.retry_failed_deliveries(pushing, principal=SYSTEM_PRINCIPAL, destination="gone")
    sent.clear()
    assert results.retry_failed_deliveries(pushing, principal=SYSTEM_PRINCIPAL) == [delivery_id]
    assert _row(pushing, delivery_id)[:2] == ("pending", 0)
    assert sent == [(queue.DELIVER_TASK, delivery_id)]
