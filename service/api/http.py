"""The HTTP protocol `clinfer serve` runs: uvicorn's httptools protocol (its h11 one where httptools is not
installed), with Nagle's algorithm off on every connection."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class _NoDelay:
    """TCP_NODELAY on each accepted connection, before uvicorn's protocol takes it.

    With several API processes uvicorn binds the listening socket itself (``socket.socket(AF_INET)``, protocol
    number 0), and asyncio turns Nagle's algorithm off only on sockets whose protocol is IPPROTO_TCP; the accepted
    connections inherit the 0. Each small response then waited for the client's delayed ACK: 44 ms a request,
    measured, against 1.2 ms with one process (whose socket asyncio creates itself).
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport.get_extra_info("socket"))
        super().connection_made(transport)  # type: ignore[misc]


class NoDelayH11Protocol(_NoDelay, H11Protocol):
    """uvicorn's pure-Python h11 protocol, with TCP_NODELAY."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed
    HttpToolsProtocol = None


def http_protocol() -> type[asyncio.Protocol]:
    """The protocol class for uvicorn: httptools' C parser with TCP_NODELAY, or h11's where httptools cannot be
    imported. h11 parses in pure Python and cost the API process several times the CPU per request."""
    if HttpToolsProtocol is None:
        return NoDelayH11Protocol

    class NoDelayHttpToolsProtocol(_NoDelay, HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's httptools protocol, with TCP_NODELAY."""

    return NoDelayHttpToolsProtocol


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on a TCP socket; nothing for other sockets (a Unix socket has no Nagle)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # a connection already reset: the protocol will see it
        pass
