"""The bench's load-generating client: keep-alive, bodies both ways, failures raised, a broken connection replaced."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.bench import RequestFailed, _Client


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: list[int] = []

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(200, f"{len(data)} {self.headers['X-Test']}".encode())

    def do_GET(self) -> None:  # noqa: N802
        _Handler.connections.append(self.client_address[1])  # the client's port: one per connection
        if self.path.startswith("/missing"):
            self._answer(404, b"no such thing")
        elif self.path == "/drop":
            self.close_connection = True  # closed without an answer
        else:
            self._answer(200, self.path.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.connections.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_requests_share_one_connection_and_carry_their_bodies(base: str) -> None:
    client = _Client(base, timeout=5)
    assert client.request("POST", "/fhir", body=b"x" * 3_000_000, headers={"X-Test": "a"}) == (200, b"3000000 a")
    assert client.request("GET", "/v1/report?wait=120", headers={}) == (200, b"/v1/report?wait=120")
    assert client.request("GET", "/again", headers={}) == (200, b"/again")
    assert len(set(_Handler.connections)) == 1, "keep-alive: one connection for all"
    client.close()


def test_an_error_answer_is_raised_with_its_status_and_the_connection_stays(base: str) -> None:
    client = _Client(base, timeout=5)
    with pytest.raises(RequestFailed, match="GET /missing: 404"):
        client.request("GET", "/missing?secret=1", headers={})
    assert client.request("GET", "/after", headers={}) == (200, b"/after")
    assert len(set(_Handler.connections)) == 1
    client.close()


def test_a_connection_closed_without_an_answer_fails_that_request_only(base: str) -> None:
    client = _Client(base, timeout=5)
    with pytest.raises(OSError):  # http.client's RemoteDisconnected is a ConnectionResetError
        client.request("GET", "/drop", headers={})
    assert client.request("GET", "/next", headers={}) == (200, b"/next")
    assert len(set(_Handler.connections)) == 2, "a new connection after the broken one"
    client.close()
