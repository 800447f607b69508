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
