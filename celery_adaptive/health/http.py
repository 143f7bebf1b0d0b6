"""``/healthz`` and ``/readyz`` over HTTP (``adaptive_health_port``), for HTTP probes.

One daemon thread runs a stdlib HTTP server; each request asks the `HealthMonitor` (which only
reads a few attributes), so a blocked event loop does not block the answer: the answer is 503
with the reason. 200 and 503 carry a one-line JSON body. Loopback unless
``adaptive_health_address`` says otherwise; no authentication, and nothing but the status.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celery_adaptive.health.monitor import HealthMonitor

logger = logging.getLogger("celery_adaptive.health")


class HealthServer:
    def __init__(self, monitor: HealthMonitor, address: str, port: int) -> None:
        self.monitor = monitor
        self.address = address
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Serve; False (with an error logged) when the port cannot be bound. Never raises."""
        monitor = self.monitor

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path not in ("/healthz", "/readyz"):
                    self._reply(404, {"error": "try /healthz or /readyz"})
                    return
                status = monitor.status()
                ok = status.alive if path == "/healthz" else status.ready
                self._reply(200 if ok else 503, status.to_dict())

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = (json.dumps(body) + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a probe every few seconds is not worth a log line

        try:
            self._server = ThreadingHTTPServer((self.address, self.port), Handler)
        except OSError as exc:
            logger.error("Cannot serve health probes on %s:%s (%s)", self.address, self.port, exc)
            return False
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="adaptive-health-http", daemon=True)
        self._thread.start()
        logger.info("Health probes on http://%s:%s/healthz and /readyz", self.address, self.port)
        return True

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
