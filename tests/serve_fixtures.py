"""Shared by the serving tests: an app served by uvicorn in a thread on a free loopback port."""
from __future__ import annotations

import threading
import time

import uvicorn

from model.serve.api import listen


class LoopbackServer:
    """app on 127.0.0.1 at a free port until close()."""

    def __init__(self, app):
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
