"""The sidecar's HTTP endpoints: /metrics (Prometheus text format) and /health (JSON).

/metrics is exporters/exposition.py's body: the fast task metrics followed by every other
collector, rendered so that one bad series cannot fail the scrape. It is not gzipped: at
200 names x 20 workers the body is ~19 MB and gzip would add ~40 ms to a scrape that
Prometheus makes on the internal network.

/health answers 200 only while the sidecar can do its job: connected to the broker.
A refused config edit is reported there but keeps 200, because the previous config
stays live.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


def _handler(metrics: Callable[[], list[bytes]], health: Callable[[], tuple[bool, dict[str, Any]]]):
    class Handler(BaseHTTPRequestHandler):
        server_version = "celery-sidecar"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                # Chunks rather than one concatenation: the task metrics can be tens of MB.
                self._send(200, metrics(), CONTENT_TYPE_LATEST)
            elif path == "/health":
                ok, body = health()
                self._send(200 if ok else 503, [json.dumps(body, indent=2).encode()], "application/json")
            elif path == "/":
                self._send(200, [b"celery-sidecar: see /metrics and /health\n"], "text/plain")
            else:
                self._send(404, [b"not found\n"], "text/plain")

        def _send(self, code: int, body: list[bytes], content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(sum(map(len, body))))
            self.end_headers()
            for chunk in body:
                self.wfile.write(chunk)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler


class HttpServer:
    def __init__(self, bind: str, port: int, metrics: Callable[[], list[bytes]],
                 health: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        try:
            self._server = ThreadingHTTPServer((bind, port), _handler(metrics, health))
        except OSError as exc:
            raise OSError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
