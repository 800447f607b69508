"""The in-process "a report was stored" signal that wakes GET .../report?wait= requests."""

from __future__ import annotations

import threading

from service.flows.analysis import _ReportSignal


def test_a_report_stored_between_the_look_and_the_wait_still_wakes_the_waiter() -> None:
    signal = _ReportSignal()
    mark = signal.current()  # the request takes its mark, then looks in the database: no report yet
    signal.notify()  # meanwhile a worker thread stores the report
    assert signal.wait(30, since=mark) is True  # at once, not after the timeout


def test_without_a_new_report_the_wait_times_out() -> None:
    signal = _ReportSignal()
    assert signal.wait(0.01, since=signal.current()) is False


def test_a_later_report_wakes_every_waiter() -> None:
    signal = _ReportSignal()
    mark = signal.current()
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(signal.wait(30, since=mark))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    signal.notify()
    for waiter in waiters:
        waiter.join(timeout=30)
    assert woken == [True, True, True]


def test_a_report_wakes_only_the_waiters_of_its_study() -> None:
    signal = _ReportSignal()
    mine, other = "1.2.3", "1.2.4"
    mark = signal.current(mine)
    signal.notify(other)  # another study's report: no reason to look in the database
    assert signal.wait(0.01, since=mark, study_instance_uid=mine) is False
    signal.notify(mine)
    assert signal.wait(30, since=mark, study_instance_uid=mine) is True
    # an event that names no study wakes every waiter
    mark = signal.current(other)
    signal.notify()
    assert signal.wait(30, since=mark, study_instance_uid=other) is True


def test_a_forgotten_study_wakes_its_waiter_rather_than_sleeping() -> None:
    signal = _ReportSignal()
    signal.notify("1.2.3")
    mark = signal.current("1.2.3")
    for index in range(_ReportSignal._REMEMBERED):  # more studies than are remembered push it out
        signal.notify(f"2.{index}")
    assert signal.wait(0.01, since=mark, study_instance_uid="1.2.3") is True
