"""A JWKS endpoint on 127.0.0.1 for the verifier tests, counting the fetches it serves."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JwksServer:
    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        # Seconds between the bytes of a body that drips (a provider that stopped
        # answering as it should); 0: all at once.
        self.drip_s = 0.0
        self.hits = 0
        self._lock = threading.Lock()
        self.url = ""

    def publish(self, *keys: dict[str, Any]) -> None:
        self.document = {"keys": list(keys)}

    def _respond(self) -> tuple[int, bytes]:
        with self._lock:
            self.hits += 1
            return self.status, json.dumps(self.document).encode()


@contextlib.contextmanager
def serve_jwks() -> Iterator[JwksServer]:
    state = JwksServer()
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = state._respond()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not state.drip_s:
                self.wfile.write(body)
                return
            for i in range(len(body)):
                if stopping.wait(state.drip_s):
                    return
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/jwks"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
