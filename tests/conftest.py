"""Shared fixtures: settings on a temporary state dir, the embedded app, tokens, real PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from service.api import auth
from service.api.main import create_app
from service.config import Settings, get_settings
from service.flows import queue
from service.flows.runtime import Runtime, build_runtime, set_runtime

REPO = Path(__file__).resolve().parents[1]
REQUIRE_SERVICES = os.environ.get("CLINFER_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get("CLINFER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CLINFER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(url: str) -> bool:
    parsed = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=2):
            return True
    except OSError:
        return False


def need_service(url: str, name: str) -> None:
    if not _reachable(url):
        message = f"{name} at {url} is not reachable"
        if REQUIRE_SERVICES:
            pytest.fail(message + " (CLINFER_REQUIRE_SERVICES=1)")
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL, dropped afterwards."""
    need_service(POSTGRES_URL, "PostgreSQL")
    import sqlalchemy

    name = f"clinfer_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    need_service(REDIS_URL, "Redis")
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's ``name`` on PATH, passing over pynetdicom's console scripts of the same names (echoscu,
    storescu, storescp), which a virtual environment put first on PATH would otherwise find first."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True, timeout=30)
        if version.stdout.startswith("$dcmtk:"):
            return str(candidate)
    message = f"dcmtk's {name} is not installed (make install installs it with apt-get)"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def serve_over_http(runtime: Runtime) -> Iterator[str]:
    """The app on a real socket (uvicorn in a thread), for clients that speak HTTP; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime), host="127.0.0.1", port=port, log_level="warning", access_log=False, log_config=None
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextlib.contextmanager
def dimse_listener(settings: Settings) -> Iterator[Runtime]:
    """Our DICOM listener (C-ECHO, C-STORE SCP) on ``settings.dimse_port``, with the process runtime installed."""
    from service.dimse import scp

    runtime = build_runtime(settings)
    set_runtime(runtime)
    server = scp.start(runtime, block=False)
    assert server is not None
    try:
        yield runtime
    finally:
        server.shutdown()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "state_dir": tmp_path / "var",
        "model_repository": REPO / "models",
        "study_stable_seconds": 3600,
        "completeness_scan_seconds": 0.5,
        "dimse_embedded": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if (
            key.startswith("CLINFER_")
            and key not in ("CLINFER_REQUIRE_SERVICES",)
            and not key.startswith("CLINFER_TEST_")
        ):
            monkeypatch.delenv(key)
    get_settings.cache_clear()
    queue.reset_celery()
    yield
    set_runtime(None)
    queue.reset_celery()
    get_settings.cache_clear()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def runtime(settings: Settings) -> Runtime:
    built = build_runtime(settings)
    set_runtime(built)
    return built


@pytest.fixture(params=["sqlite", "postgresql"])
def any_runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    """The process runtime on SQLite, then on a fresh PostgreSQL database (batching off: stages called in tests)."""
    database = {"database_url": request.getfixturevalue("postgres_url")} if request.param == "postgresql" else {}
    built = build_runtime(make_settings(tmp_path, batching=False, **database))
    set_runtime(built)
    yield built
    built.engine.dispose()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    """The embedded default in one process: API, in-process Celery worker (memory broker), SQLite, local blobs."""
    with TestClient(create_app(runtime)) as test_client:
        yield test_client


class Tokens:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def header(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {auth.mint_token(self.settings, role=role)}"}


@pytest.fixture
def tokens(settings: Settings) -> Tokens:
    return Tokens(settings)
