"""``manage.py serve_metrics [--port 9101] [--addr 0.0.0.0]``: /metrics for a machine that runs only workers.

The web process's ``/metrics`` sums the counters of every process that shares its
``PROMETHEUS_MULTIPROC_DIR``, i.e. of its own machine. A machine that runs only Celery workers
serves its workers' counters and histograms with this command (scrape it as another target).
The gauges counted from the database are left to the web's ``/metrics``, so they are not
reported twice.
"""

from __future__ import annotations

import signal
import threading

from django.core.management.base import BaseCommand, CommandError
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

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

    def handle(self, *args, **options) -> None:
        server, _thread = start_http_server(options["port"], addr=options["addr"], registry=self.registry())
        self.stdout.write(f"serving worker metrics on http://{options['addr']}:{options['port']}/metrics")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.shutdown()
