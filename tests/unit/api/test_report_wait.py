"""How GET .../report?wait= looks in the database while it waits: once at first, again when a report of the study
is announced, and otherwise at growing intervals (the fallback for a lost announcement), not every half second;
the look that finds the analysis finished returns the report it read."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from service.api.routes import v1
from service.flows import analysis
from service.schemas import Principal

STUDY = "1.2.826.0.1.3680043.10.9"
READER = Principal(subject="dr", role="clinician")
REPORT = {"study_instance_uid": STUDY, "reports": []}


def _looks(monkeypatch: pytest.MonkeyPatch, finished: list[bool]) -> list[bool]:
    """Each look made, with whether it asked only for a finished analysis."""
    looks: list[bool] = []

    def finished_report(_runtime: Any, study_instance_uid: str, principal: Principal) -> Any:
        assert (study_instance_uid, principal) == (STUDY, READER)
        looks.append(True)
        return REPORT if finished[0] else None

    def report(_runtime: Any, study_instance_uid: str, principal: Principal) -> Any:
        assert (study_instance_uid, principal) == (STUDY, READER)
        looks.append(False)
        return REPORT

    monkeypatch.setattr(v1, "_finished_report", finished_report)
    monkeypatch.setattr(v1, "_report", report)
    return looks


def test_without_an_announcement_the_looks_grow_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    looks = _looks(monkeypatch, [False])
    assert asyncio.run(v1._wait_for_report(None, STUDY, READER, 3.5)) == REPORT
    # at 0, 1 and 3 seconds, then the report as it stands at the deadline; a look every half second would have
    # made 8 before it
    assert looks == [True, True, True, False]


def test_an_announced_report_is_looked_for_at_once_and_read_by_that_look(monkeypatch: pytest.MonkeyPatch) -> None:
    finished = [False]
    looks = _looks(monkeypatch, finished)

    def store_the_report() -> None:
        finished[0] = True
        analysis.REPORT_STORED.notify(STUDY)

    async def scenario() -> Any:
        threading.Timer(0.2, store_the_report).start()  # a worker thread stores it while the request waits
        return await v1._wait_for_report(None, STUDY, READER, 30)

    assert asyncio.run(asyncio.wait_for(scenario(), 0.9)) == REPORT  # well before the first fallback look, at 1 s
    assert looks == [True, True]
