"""``manage.py serve_metrics [--port 9101] [--addr 0.0.0.0]``: /metrics for a machine that runs only workers.

The web process's ``/metrics`` sums the counters of every process that shares its
``PROMETHEUS_MULTIPROC_DIR``, i.e. of its own machine. A machine that runs only Celery workers
serves its workers' counters and histograms with this command (scrape it as another target).
The gauges counted from the database are left to the web's ``/metrics``, so they are not
reported twice. Like ``/metrics``, it requires ``Authorization: Bearer <ORCHESTRATOR_METRICS_TOKEN>``
when that setting is set (compared in constant time; 401 otherwise).
"""

from __future__ import annotations

import hmac
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import make_server

from django.core.management.base import BaseCommand, CommandError
from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from orchestrator_site.conf import conf
from runs.metrics import multiprocess_dir


class Command(BaseCommand):
    help = "Serve the Prometheus counters of this machine's worker processes (multiprocess mode)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--port", type=int, default=9101)
        parser.add_argument("--addr", default="0.0.0.0")

    def registry(self) -> CollectorRegistry:
        """A registry reading every process's metric files. Raises CommandError when multiprocess mode is off."""
        if not multiprocess_dir():
            raise CommandError("PROMETHEUS_MULTIPROC_DIR is not set: nothing to serve")
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry

    def wsgi_app(self, registry: CollectorRegistry) -> Callable[[dict[str, Any], Callable], Iterable[bytes]]:
        """prometheus_client's exposition app behind the ``ORCHESTRATOR_METRICS_TOKEN`` check."""
        app = make_wsgi_app(registry)

        def guarded(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
            token = conf.metrics_token
            given = environ.get("HTTP_AUTHORIZATION", "")
            if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"authentication required\n"]
            return app(environ, start_response)

        return guarded

    def handle(self, *args, **options) -> None:
        server = make_server(
            options["addr"],
            options["port"],
            self.wsgi_app(self.registry()),
            ThreadingWSGIServer,
            handler_class=_SilentHandler,
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.stdout.write(f"serving worker metrics on http://{options['addr']}:{options['port']}/metrics")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.shutdown()
