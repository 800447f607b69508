"""How GET .../report?wait= looks in the database while it waits: once at first, again when a report of the study
is announced, and otherwise at growing intervals (the fallback for a lost announcement), not every half second."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from service.api.routes import v1
from service.flows import analysis
from service.store import jobs

STUDY = "1.2.826.0.1.3680043.10.9"


class _Runtime:
    @contextlib.contextmanager
    def sessions(self) -> Iterator[None]:
        yield None


def _looks(monkeypatch: pytest.MonkeyPatch, states: list[str]) -> list[int]:
    looks: list[int] = []

    def states_for_study(**_: Any) -> list[str]:
        looks.append(1)
        return list(states)

    monkeypatch.setattr(jobs, "states_for_study", states_for_study)
    return looks


def test_without_an_announcement_the_looks_grow_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    looks = _looks(monkeypatch, ["inferring"])
    asyncio.run(v1._wait_for_reports(_Runtime(), STUDY, 3.5))
    # at 0, 1 and 3 seconds and a last one at the deadline; a look every half second would have made 8
    assert len(looks) == 4


def test_an_announced_report_is_looked_for_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    states = ["inferring"]
    looks = _looks(monkeypatch, states)

    def store_the_report() -> None:
        states[:] = ["succeeded"]
        analysis.REPORT_STORED.notify(STUDY)

    async def scenario() -> None:
        threading.Timer(0.2, store_the_report).start()  # a worker thread stores it while the request waits
        await v1._wait_for_reports(_Runtime(), STUDY, 30)

    asyncio.run(asyncio.wait_for(scenario(), 0.9))  # well before the first fallback look, at 1 s
    assert len(looks) == 2
