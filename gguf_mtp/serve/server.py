"""Running the app under uvicorn: binding, the address it got, and a graceful stop on SIGTERM / Ctrl-C.

On the first signal the server stops taking requests (503, and uvicorn closes its listening socket), running
ones get ``grace`` seconds to finish (the scheduler's ``stop(grace)`` cancels what is left, and each cancelled
stream ends with an error event), then the process exits; uvicorn's own graceful timeout (a little longer) cancels
any connection still open, so nothing hangs. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from ..errors import GgufMtpError
from .app import ServerState

SHUTDOWN_MARGIN_S = 5.0  # uvicorn waits this long past the grace period before cancelling connections
BACKLOG = 2048  # uvicorn's default


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port is one clear error, not a late one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)  # ours from here: early clients wait in the backlog until the model is loaded
    except OSError as e:  # the port is taken, the address is not ours, the name does not resolve
        sock.close()
        raise GgufMtpError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, telling ``state`` when shutdown begins and ``on_ready`` the address it bound."""

    def __init__(self, config: uvicorn.Config, state: ServerState,
                 on_ready: Callable[[str, int], None] | None = None) -> None:
        super().__init__(config)
        self.state, self.on_ready = state, on_ready

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.begin_shutdown()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.on_ready is not None and self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_ready(host, port)


def make_server(app: Any, state: ServerState, *, verbose: bool = False,
                on_ready: Callable[[str, int], None] | None = None) -> Server:
    """The server; ``run(sockets=[bind(host, port)])`` serves until a signal or ``should_exit``."""
    config = uvicorn.Config(app, log_level="info" if verbose else "warning",
                            access_log=verbose, lifespan="on",
                            timeout_graceful_shutdown=state.config.grace + SHUTDOWN_MARGIN_S)
    return Server(config, state, on_ready)


@contextlib.contextmanager
def quiet_sigterm() -> Iterator[None]:
    """uvicorn raises the signal that stopped it again once it has shut down; after a graceful stop on SIGTERM
    that should end the command normally (exit 0, our cleanup run), not kill the process."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
