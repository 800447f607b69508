"""CLINFER_API_THREADS: how many blocking endpoint calls one API process runs at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.errors import NotFound
from service.flows.runtime import build_runtime
from service.store import jobs
from tests.conftest import Tokens, make_settings, serve_over_http


async def _thread_tokens() -> float:
    return anyio.to_thread.current_default_thread_limiter().total_tokens


@pytest.mark.parametrize(("configured", "expected"), [({}, 4), ({"api_threads": 2}, 2)])
def test_the_setting_sizes_the_thread_limiter(tmp_path: Path, configured: dict[str, int], expected: int) -> None:
    runtime = build_runtime(make_settings(tmp_path, **configured))
    with TestClient(create_app(runtime)) as client:
        assert client.portal.call(_thread_tokens) == expected  # anyio's own default is 40


def test_blocking_calls_beyond_the_threads_wait_their_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, api_threads=2)
    runtime = build_runtime(settings)
    lock = threading.Lock()
    running, most = 0, 0

    def slow_lookup(**_: object) -> None:  # GET /v1/jobs/{id} runs this in a thread of the pool
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.3)
        with lock:
            running -= 1
        raise NotFound("no such job")

    monkeypatch.setattr(jobs, "get_or_raise", slow_lookup)
    header = Tokens(settings).header("admin")
    statuses: list[int] = []
    with serve_over_http(runtime) as base:

        def ask(n: int) -> None:
            statuses.append(httpx.get(f"{base}/v1/jobs/job-{n}", headers=header, timeout=30).status_code)

        clients = [threading.Thread(target=ask, args=(n,)) for n in range(5)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
    assert statuses == [404] * 5  # every request answered, in its turn
    assert most == 2
