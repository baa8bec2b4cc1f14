"""The relay's HTTP side: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/metrics`` is prometheus-client's own WSGI exposition (``Accept`` negotiation, OpenMetrics,
gzip). The server is waitress: idle connections wait in its event loop, not in threads, and are
closed after ``idle_timeout`` seconds without traffic; at most ``threads`` requests are served
at once and at most ``connection_limit`` connections are kept open. So idle or slow clients
cannot grow the relay's threads, and probes are answered while hundreds of them hang on. No
handler talks to MongoDB: a probe answers even while the server it watches does not.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import make_wsgi_app
from waitress.server import create_server

if TYPE_CHECKING:
    from ._relay import Relay

__all__ = ["RelayHTTPServer"]

log = logging.getLogger("mongo_outbox.relay")

_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_STATUS = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}


class RelayHTTPServer:
    """Serves one relay's metrics and probes on ``host``:``port`` (port 0: any free port)."""

    def __init__(
        self,
        relay: Relay,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        threads: int = 4,
        connection_limit: int = 1000,
        idle_timeout: float = 5.0,
    ) -> None:
        self._server = create_server(
            relay_app(relay),
            host=host,
            port=port,
            threads=threads,
            connection_limit=connection_limit,
            channel_timeout=idle_timeout,
            cleanup_interval=min(1.0, idle_timeout),
            ident="mongo-outbox",
            expose_tracebacks=False,
            asyncore_use_poll=True,  # select() cannot watch descriptors above 1023
        )
        self._thread = threading.Thread(target=self._serve, name="outbox-http", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.effective_port)  # type: ignore[union-attr]

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed under the loop by close()
            self._server.run()

    def close(self) -> None:
        """Stop serving."""
        self._server.close()
        self._thread.join(timeout=5.0)


def relay_app(relay: Relay) -> Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]:
    """The WSGI application of ``relay``'s HTTP side."""
    metrics = make_wsgi_app(relay.metrics.registry)

    def app(environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            relay.refresh_metrics()
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok, reason = relay.health.live() if path == "/healthz" else relay.health.ready()
            return _text(start_response, 200 if ok else 503, f"{reason}\n")
        return _text(start_response, 404, "not found: try /metrics, /healthz or /readyz\n")

    return app


def _text(start_response: _StartResponse, status: int, text: str) -> list[bytes]:
    body = text.encode()
    start_response(
        _STATUS[status],
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
