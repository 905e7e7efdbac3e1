"""A real HTTP endpoint on 127.0.0.1 that records the first POST it receives (for webhook tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer


@dataclass
class Received:
    url: str
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    arrived: threading.Event = field(default_factory=threading.Event)


@contextmanager
def webhook_receiver(status: int = 200, path: str = "/hook") -> Iterator[Received]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.body = self.rfile.read(int(self.headers["Content-Length"]))
            received.headers = dict(self.headers)
            self.send_response(received.status)
            self.end_headers()
            received.arrived.set()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    received = Received(url=f"http://127.0.0.1:{server.server_port}{path}", status=status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
