"""Test helpers: a free loopback port, and an app served by uvicorn in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


def free_port() -> int:
    """A loopback TCP port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, start_timeout_s: float = 30.0, stop_timeout_s: float = 30.0) -> Iterator[int]:
    """``with serve_in_thread(app) as port:`` runs the ASGI ``app`` under uvicorn on a loopback port in a thread
    and stops it afterwards."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, f"uvicorn did not start within {start_timeout_s:.0f} s"
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout_s)
