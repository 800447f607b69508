"""The "a report was stored" signal that wakes GET .../report?wait= requests, which wait on the event loop."""

from __future__ import annotations

import asyncio
import threading

from service.flows.analysis import _ReportSignal

STUDY, OTHER = "1.2.3", "1.2.4"


def test_a_report_stored_between_the_look_and_the_wait_still_wakes_the_waiter() -> None:
    signal = _ReportSignal()
    mark = signal.current(STUDY)  # the request takes its mark, then looks in the database: no report yet
    signal.notify(STUDY)  # meanwhile a worker thread stores the report
    assert asyncio.run(signal.wait(30, since=mark, study_instance_uid=STUDY)) is True  # at once


def test_without_a_new_report_the_wait_times_out() -> None:
    signal = _ReportSignal()
    assert asyncio.run(signal.wait(0.01, since=signal.current(STUDY), study_instance_uid=STUDY)) is False
    assert signal._futures == {}  # the timed-out waiter is forgotten


def test_a_report_stored_by_a_worker_thread_wakes_every_waiter_of_its_study_only() -> None:
    signal = _ReportSignal()

    async def scenario() -> list[bool]:
        mine, other = signal.current(STUDY), signal.current(OTHER)
        waiters = [signal.wait(30, since=mine, study_instance_uid=STUDY) for _ in range(50)]
        waiters.append(signal.wait(0.2, since=other, study_instance_uid=OTHER))
        # from another thread, as the embedded worker and the Redis subscriber do, once the waiters are waiting
        asyncio.get_running_loop().call_later(0.05, threading.Thread(target=signal.notify, args=(STUDY,)).start)
        return await asyncio.gather(*waiters)

    woken = asyncio.run(scenario())
    assert woken == [True] * 50 + [False]  # the other study's waiter was not woken: it timed out
    assert signal._futures == {}


def test_an_event_that_names_no_study_wakes_every_waiter() -> None:
    signal = _ReportSignal()

    async def scenario() -> list[bool]:
        marks = {uid: signal.current(uid) for uid in (STUDY, OTHER)}
        waiters = [signal.wait(30, since=mark, study_instance_uid=uid) for uid, mark in marks.items()]
        asyncio.get_running_loop().call_later(0.05, signal.notify)
        return await asyncio.gather(*waiters)

    assert asyncio.run(scenario()) == [True, True]


def test_a_forgotten_study_wakes_its_waiter_rather_than_sleeping() -> None:
    signal = _ReportSignal()
    signal.notify(STUDY)
    mark = signal.current(STUDY)
    for index in range(_ReportSignal._REMEMBERED):  # more studies than are remembered push it out
        signal.notify(f"2.{index}")
    assert asyncio.run(signal.wait(0.01, since=mark, study_instance_uid=STUDY)) is True
