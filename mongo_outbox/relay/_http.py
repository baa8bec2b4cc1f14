"""The relay's HTTP side: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

Served from a daemon thread; no handler talks to MongoDB, so a probe answers even while the
server it watches does not.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from ._relay import Relay

__all__ = ["RelayHTTPServer"]

log = logging.getLogger("mongo_outbox.relay")


class RelayHTTPServer:
    """Serves one relay's metrics and probes on ``host``:``port`` (port 0: any free port)."""

    def __init__(self, relay: Relay, host: str = "0.0.0.0", port: int = 0) -> None:
        self._relay = relay
        handler = _handler_for(relay)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-http", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(relay: Relay) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                relay.refresh_metrics()
                self._send(200, generate_latest(relay.metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, reason = relay.health.live() if path == "/healthz" else relay.health.ready()
                self._send(200 if ok else 503, f"{reason}\n".encode(), "text/plain")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
