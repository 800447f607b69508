"""Tokens checked against an issuer's JWKS (CLINFER_AUTH_JWKS_URL) that hangs, serves garbage, or goes away: each
costs a bounded wait, never a 500, and a key fetched before the outage keeps verifying tokens through it.

The issuer is a real HTTP server on a local socket, switched between serving its keys, hanging, and garbage.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api import auth
from service.api.main import create_app
from service.config import Settings
from service.flows.runtime import Runtime, build_runtime, set_runtime
from service.store.tables import AuditEvent
from tests.conftest import make_settings, serve_over_http

TIMEOUT = 0.5  # CLINFER_AUTH_JWKS_TIMEOUT_SECONDS in these tests
HANG_SECONDS = 6.0  # how long the hanging issuer holds a request (longer than any bounded wait here)


class Issuer:
    """A JWKS endpoint: ``mode`` is "keys" (its key set), "hang" (answers nothing for HANG_SECONDS) or "garbage"
    (an HTML page). ``requests`` counts the fetches it received."""

    def __init__(self) -> None:
        self.keys = {"key-1": ec.generate_private_key(ec.SECP256R1())}  # published, by key id
        self.mode = "keys"
        self.requests = 0
        self.released = threading.Event()
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests += 1
                if issuer.mode == "hang":
                    issuer.released.wait(HANG_SECONDS)
                    return
                if issuer.mode == "garbage":
                    body, media = b"<html><body>502 Bad Gateway</body></html>", "text/html"
                else:
                    published = [
                        json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": kid, "use": "sig"}
                        for kid, key in issuer.keys.items()
                    ]
                    body, media = json.dumps({"keys": published}).encode(), "application/json"
                self.send_response(200)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"

    def token(self, kid: str = "key-1", *, key: ec.EllipticCurvePrivateKey | None = None) -> dict[str, str]:
        """A fresh token (its own jti: never one verified before) signed with the issuer's key ``kid`` (or ``key``)."""
        now = dt.datetime.now(dt.UTC)
        claims = {
            "iss": "https://idp.example.org",
            "aud": "clinfer",
            "sub": "clinician-7",
            "exp": now + dt.timedelta(minutes=5),
            "jti": uuid.uuid4().hex,
            "scope": "user/Patient.rs",
        }
        signed = jwt.encode(claims, key or self.keys[kid], algorithm="ES256", headers={"kid": kid})
        return {"Authorization": f"Bearer {signed}"}


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    running = Issuer()
    thread = threading.Thread(target=running.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.released.set()
        running.server.shutdown()
        running.server.server_close()


@pytest.fixture
def jwks_runtime(tmp_path: Path, issuer: Issuer) -> Runtime:
    settings = make_settings(
        tmp_path,
        auth_jwks_url=issuer.url,
        auth_issuer="https://idp.example.org",
        auth_jwks_timeout_seconds=TIMEOUT,
    )
    runtime = build_runtime(settings)
    set_runtime(runtime)
    return runtime


def _denials(runtime: Runtime) -> list[AuditEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == "access.denied")))


@contextlib.contextmanager
def _timed() -> Iterator[list[float]]:
    elapsed: list[float] = []
    started = time.monotonic()
    yield elapsed
    elapsed.append(time.monotonic() - started)


def test_a_hanging_issuer_costs_one_bounded_wait_and_later_requests_fail_fast(
    jwks_runtime: Runtime, issuer: Issuer
) -> None:
    """Found in review: the JWKS was fetched with a 30 s timeout under a lock, and a failed fetch was tried again
    by the next request: while the issuer hung, each request waited in turn (tokens 60 to 120 s, /readyz 88 s).
    Now the fetch gives up after CLINFER_AUTH_JWKS_TIMEOUT_SECONDS, and the next try waits JWKS_RETRY_SECONDS:
    the requests meanwhile are answered at once, 503 with Retry-After (no key was ever fetched)."""
    issuer.mode = "hang"
    with serve_over_http(jwks_runtime) as base, httpx.Client(base_url=base, timeout=30) as http:
        with _timed() as first_took:
            first = http.get("/fhir/metadata", headers=issuer.token())
        assert first_took[0] < TIMEOUT + 1.5, f"the first request waited {first_took[0]:.1f} s"
        assert first.status_code == 503, first.text
        assert 1 <= int(first.headers["retry-after"]) <= auth.JWKS_RETRY_SECONDS
        assert first.json()["resourceType"] == "OperationOutcome"

        def one(path: str) -> int:
            return http.get(path, headers=issuer.token()).status_code

        with _timed() as burst_took, concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, ["/fhir/metadata", "/v1/studies"] * 8))
        assert statuses == [503] * 16
        assert burst_took[0] < 1.5, f"16 requests within the back-off took {burst_took[0]:.1f} s"
        assert issuer.requests == 1, "one fetch in the back-off, not one a request"
    denials = _denials(jwks_runtime)
    assert len(denials) == 17 and {d.detail["reason"] for d in denials} == {"jwks-unavailable"}


def test_a_key_fetched_before_the_outage_keeps_verifying_through_it(
    jwks_runtime: Runtime, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key set is refreshed while the issuer hangs: the request that tries waits at most the timeout, the
    others (their key at hand) do not wait for it, and all are admitted with the keys fetched before."""
    monkeypatch.setattr(auth, "JWKS_RETRY_SECONDS", 0.5, raising=False)
    with serve_over_http(jwks_runtime) as base, httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/fhir/metadata", headers=issuer.token()).status_code == 200  # the key set is fetched
        issuer.mode = "hang"
        monkeypatch.setattr(auth, "JWKS_REFRESH_SECONDS", 0.0, raising=False)  # every request finds it stale
        time.sleep(0.6)  # past the back-off: the next request refreshes

        def one(_: int) -> int:
            return http.get("/fhir/metadata", headers=issuer.token()).status_code

        with _timed() as took, concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(16)))
        assert statuses == [200] * 16, statuses
        assert took[0] < TIMEOUT + 1.5, f"requests with a key at hand waited {took[0]:.1f} s for the issuer"
        assert 2 <= issuer.requests <= 4, "refreshes were tried during the outage, one a back-off at most"
        other = ec.generate_private_key(ec.SECP256R1())
        unknown = http.get("/fhir/metadata", headers=issuer.token("key-2", key=other))
        assert unknown.status_code == 401, unknown.text  # keys are at hand, this one is not among them


def test_a_key_the_issuer_removes_stops_verifying(
    jwks_runtime: Runtime, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, keys were kept by key id for ever (PyJWKClient's key cache): a key the issuer withdrew went on
    admitting tokens. The key set is fetched again once JWKS_REFRESH_SECONDS old, and a new key id is looked
    up (JWKS_RETRY_SECONDS after the last fetch at the soonest)."""
    with TestClient(create_app(jwks_runtime)) as client:
        assert client.get("/fhir/metadata", headers=issuer.token("key-1")).status_code == 200
        withdrawn = issuer.keys["key-1"]
        issuer.keys = {"key-2": ec.generate_private_key(ec.SECP256R1())}  # rotated: key-1 withdrawn
        monkeypatch.setattr(auth, "JWKS_REFRESH_SECONDS", 0.0, raising=False)
        monkeypatch.setattr(auth, "JWKS_RETRY_SECONDS", 0.0, raising=False)
        refused = client.get("/fhir/metadata", headers=issuer.token("key-1", key=withdrawn))
        assert refused.status_code == 401, refused.text
        assert client.get("/fhir/metadata", headers=issuer.token("key-2")).status_code == 200


def test_garbage_from_the_issuer_is_never_a_500(
    jwks_runtime: Runtime, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a JWKS that was not JSON raised JSONDecodeError: a 500, and no access.denied event."""
    issuer.mode = "garbage"
    with TestClient(create_app(jwks_runtime), raise_server_exceptions=False) as client:
        fhir = client.get("/fhir/Patient", headers=issuer.token())
        assert fhir.status_code == 503 and fhir.headers["retry-after"], fhir.text
        assert fhir.json()["resourceType"] == "OperationOutcome"
        native = client.get("/v1/studies", headers=issuer.token())
        assert native.status_code == 503 and native.json()["error"]["code"] == "jwks-unavailable", native.text
        assert [d.detail["reason"] for d in _denials(jwks_runtime)] == ["jwks-unavailable"] * 2

        monkeypatch.setattr(auth, "JWKS_RETRY_SECONDS", 0.0, raising=False)  # the back-off passed
        issuer.mode = "keys"
        assert client.get("/fhir/metadata", headers=issuer.token()).status_code == 200
        issuer.mode = "garbage"  # a refresh that fails keeps the keys fetched before
        monkeypatch.setattr(auth, "JWKS_REFRESH_SECONDS", 0.0, raising=False)
        assert client.get("/fhir/metadata", headers=issuer.token()).status_code == 200
        rotated = issuer.token("rotated", key=ec.generate_private_key(ec.SECP256R1()))
        unknown = client.get("/fhir/metadata", headers=rotated)
        assert unknown.status_code == 401 and unknown.json()["resourceType"] == "OperationOutcome", unknown.text
        assert [d.detail["reason"] for d in _denials(jwks_runtime)][-1] == "unauthenticated"


def test_the_jwks_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings(state_dir=tmp_path).auth_jwks_timeout_seconds == 3.0
    monkeypatch.setenv("CLINFER_AUTH_JWKS_TIMEOUT_SECONDS", "1.5")
    assert Settings(state_dir=tmp_path).auth_jwks_timeout_seconds == 1.5
    monkeypatch.setenv("CLINFER_AUTH_JWKS_TIMEOUT_SECONDS", "0")
    with pytest.raises(ValueError):
        Settings(state_dir=tmp_path)


def test_an_issuer_that_trickles_its_answer_costs_no_more_than_the_timeout() -> None:
    """Found in review: socket timeouts bound each read only, so an issuer sending its status line a byte every
    second held the fetch (and the request waiting for a key) for as long as it trickled: 24 s with a 3 s timeout."""
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n":
                if stop.wait(0.2):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        keys = auth.IssuerKeys(f"http://127.0.0.1:{server.server_address[1]}/jwks", TIMEOUT)
        started = time.monotonic()
        with pytest.raises(auth.KeySetUnavailable):
            keys.key_for("key-1")
        assert time.monotonic() - started < TIMEOUT + 1.0  # the trickle would last 10 s
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
