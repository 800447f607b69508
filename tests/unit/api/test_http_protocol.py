"""`clinfer serve` turns Nagle's algorithm off on the connections of every API process."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from service.api.http import NoDelayHttpToolsProtocol, set_nodelay


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": self.sock, "peername": self.sock.getpeername(), "sockname": self.sock.getsockname()}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False


def test_an_accepted_connection_of_a_protocol_0_listener_gets_tcp_nodelay() -> None:
    # what uvicorn does with several workers: socket.socket(AF_INET), protocol number 0
    with socket.socket(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # Nagle on: the problem
                loop = asyncio.new_event_loop()  # the protocol belongs to one; none is running in this test
                try:
                    protocol = NoDelayHttpToolsProtocol(
                        config=Config(app=lambda *a: None), server_state=ServerState(), app_state={}, _loop=loop
                    )
                    protocol.connection_made(_Transport(accepted))  # type: ignore[arg-type]
                finally:
                    loop.close()
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_sockets_without_nagle_are_left_alone() -> None:
    left, right = socket.socketpair()  # AF_UNIX
    with left, right:
        set_nodelay(left)  # no error, nothing to set
    set_nodelay(None)

