"""Real ``celery worker`` processes for the tests: start, kill, stop, purge their queue.

Used by the session worker (tests/conftest.py), the flow-control tests (tests/flow_support.py)
and anything else that needs worker nodes of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerSet:
    """Worker processes started by :func:`start_workers`, all on ``queue``."""

    queue: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs if path.exists())

    def kill(self, index: int) -> None:
        """SIGKILL a worker node and its pool children (a crash: no cleanup, no acks)."""
        proc = self.procs[index]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


def start_workers(
    worker_env: dict[str, str],
    log_dir: Path,
    *,
    nodes: int = 1,
    concurrency: int = 2,
    queue: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> WorkerSet:
    """Start ``nodes`` ``celery worker`` processes (prefork, ``concurrency`` children each).

    They consume ``queue`` (default: a new unique name) and have it as their default queue.
    ``env`` overrides the session worker's environment. Waits until every node is ready.
    """
    queue = queue or f"flow-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    workers = WorkerSet(queue=queue)
    full_env = {**worker_env, "ORCHESTRATOR_QUEUE": queue, **(env or {})}
    for index in range(nodes):
        log_path = log_dir / f"{queue}-{index}.log"
        handle = open(log_path, "wb")  # noqa: SIM115 - closed when the process ends
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "orchestrator_site",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(concurrency),
                "-Q",
                f"{queue},{queue}-system",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"{queue}-{index}@%h",
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=full_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.procs.append(proc)
        workers.logs.append(log_path)
    deadline = time.time() + timeout
    for proc, log_path in zip(workers.procs, workers.logs, strict=True):
        while b"ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.time() > deadline:
                workers.stop()
                raise RuntimeError(f"flow worker did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.1)
    return workers


def purge_queue(queue: str) -> None:
    """Delete a queue: its Redis lists (every priority level), or the RabbitMQ queue."""
    from django.conf import settings

    from orchestrator_site.brokers import is_amqp

    if is_amqp(settings.CELERY_BROKER_URL):
        from orchestrator_site.celery import app

        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue)
        return
    import redis

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    for name in (queue, f"{queue}-system"):
        client.delete(name, *[f"{name}:{level}" for level in range(1, 10)])
