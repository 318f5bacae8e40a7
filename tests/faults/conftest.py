"""Process control for the fault-injection suite: workers, beats, PostgreSQL and Redis.

Fault tests kill and stop real processes, so they run on their own Celery queue with their own
worker processes (never the session worker of tests/conftest.py), against the session's test
database. They run after every other test (``pytest_collection_modifyitems`` below), and the ones
that restart PostgreSQL or Redis run last of all: a restart disturbs every client of the server.
Every fixture that stops a service brings it back and waits for it, pass or fail.

Side effects are counted by :class:`Receiver`, a local HTTP server that records each request by
its ``X-Idempotency-Key`` and applies the first one per key (as an idempotent API would).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.conftest import TEST_CALLABLES

ROOT = Path(__file__).resolve().parent.parent.parent
FAULT_QUEUE = f"orchestrator-faults-{os.getpid()}"
PG_CLUSTER = ("15", "main")
REDIS_START = [
    "redis-server",
    "--daemonize", "yes",
    "--bind", "127.0.0.1", "-::1",
    "--port", "6379",
    "--save", "",
    "--appendonly", "no",
    "--dir", "/var/lib/redis",
    "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    """Fault tests after all others; those restarting PostgreSQL or Redis at the very end."""

    def rank(item) -> int:
        path = item.nodeid.replace("\\", "/")
        if "tests/faults/" not in path:
            return 0
        return 2 if "test_services" in path else 1

    items.sort(key=rank)


# --- waiting -----------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- the side-effect receiver ------------------------------------------------------------------


class Receiver:
    """An HTTP endpoint standing in for an idempotent API with side effects.

    ``POST /effect/<seconds>`` waits that long, then answers 200 ``{"ok": true}``;
    ``POST /held/<seconds>`` waits until the test opens the gate (``release()``), at most that
    long: the attempts a test kills hang there, the retries after ``release()`` pass. Every request
    is recorded with its ``X-Idempotency-Key``; the first request of a key "applies" the effect,
    later ones are duplicates (deliveries the key protected). ``applied(key)`` counts how often
    the effect of a key was applied: 1 is exactly-once.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.requests: list[tuple[str, float]] = []
        self.applied_keys: Counter[str] = Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                key = self.headers.get("X-Idempotency-Key", "")
                with outer.lock:
                    outer.requests.append((key, time.time()))
                    if key and key not in outer.applied_keys:
                        outer.applied_keys[key] += 1  # the side effect happens once per key
                match = re.match(r"/(effect|held)/([\d.]+)", self.path)
                if match and match.group(1) == "effect":
                    time.sleep(float(match.group(2)))
                elif match:
                    outer.gate.wait(float(match.group(2)))
                body = json.dumps({"ok": True}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the caller was killed meanwhile

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.applied_keys.clear()
            self.gate.clear()

    def release(self) -> None:
        """Let every request waiting on ``/held/`` (and every later one) through."""
        self.gate.set()

    def deliveries(self) -> Counter[str]:
        """Requests per idempotency key (more than 1: redelivered, protected by the key)."""
        with self.lock:
            return Counter(key for key, _ in self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# --- worker and beat processes -----------------------------------------------------------------


class Proc:
    """A celery worker or beat in its own process group (so the whole group can be signalled)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "orchestrator_site", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.Error:
            return []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (master and pool processes)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        else:
            self.signal(signal.SIGKILL)  # pool processes orphaned by a killed master
        self._log.close()


class Processes:
    """Starts fault workers and beats; stops every one of them at the end of the test."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def worker(self, name: str, concurrency: int = 2, pool: str = "prefork", env: dict[str, str] | None = None) -> Proc:
        """A worker on the fault queue, returned once it consumes ("ready." in its log)."""
        proc = Proc(
            name,
            # the fault queue and its system queue (the sweeps beat sends are routed there)
            ["worker", "-P", pool, "-c", str(concurrency), "-Q", f"{FAULT_QUEUE},{FAULT_QUEUE}-system"]
            + ["-n", f"{name}-{os.getpid()}@%h"]
            + ["--without-gossip", "--without-mingle", "-l", "INFO"],
            {**self.env, **(env or {})},
            self.log_dir / f"{name}.log",
        )
        self.procs.append(proc)
        wait_until(lambda: "ready." in proc.log() or not proc.alive(), 60, f"worker {name} to start")
        assert proc.alive(), proc.log()[-3000:]
        return proc

    def beat(self, name: str) -> Proc:
        """A beat sending ``runs.sweep`` every ORCHESTRATOR_SWEEP_INTERVAL seconds (file scheduler)."""
        proc = Proc(
            name,
            ["beat", "-S", "celery.beat:PersistentScheduler", "-s", str(self.log_dir / f"{name}-schedule")]
            + ["--pidfile=", "-l", "INFO"],
            self.env,
            self.log_dir / f"{name}.log",
        )
        self.procs.append(proc)
        wait_until(lambda: "beat: Starting" in proc.log() or not proc.alive(), 30, f"beat {name} to start")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def fault_env(worker_env, receiver, tmp_path) -> dict[str, str]:
    """The session worker's environment, on the fault queue, with short recovery timings."""
    env = dict(worker_env)
    env.update(
        ORCHESTRATOR_QUEUE=FAULT_QUEUE,
        ORCHESTRATOR_LEASE_GRACE="2",
        ORCHESTRATOR_REQUEUE_AFTER="4",
        ORCHESTRATOR_SWEEP_INTERVAL="1",
        ORCHESTRATOR_PYTHON_CALLABLES=f"tests.faults.callables.hard_exit,{TEST_CALLABLES}",
        ORCHESTRATOR_HTTP_ALLOW_HOSTS="127.0.0.1,localhost",
        ORCHESTRATOR_DATA_DIR=str(tmp_path / "worker-data"),
    )
    return env


@pytest.fixture
def fault_queue(settings) -> Iterator[str]:
    """Messages sent by this test process go to the fault queue too (restored afterwards)."""
    import redis

    from orchestrator_site.celery import app

    previous = app.conf.task_default_queue
    app.conf.task_default_queue = FAULT_QUEUE
    settings.ORCHESTRATOR_REQUEUE_AFTER = 4
    settings.ORCHESTRATOR_LEASE_GRACE = 2
    yield FAULT_QUEUE
    app.conf.task_default_queue = previous
    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        for key in client.scan_iter(match=f"{FAULT_QUEUE}*"):
            client.delete(key)
    except Exception:
        pass


@pytest.fixture
def processes(fault_env, fault_queue, transactional_db, receiver, tmp_path) -> Iterator[Processes]:
    receiver.reset()
    procs = Processes(fault_env, tmp_path)
    yield procs
    procs.stop_all()


# --- services ----------------------------------------------------------------------------------


def postgres_ready() -> bool:
    result = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False)
    return result.returncode == 0


def redis_ready() -> bool:
    result = subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True, text=True, check=False)
    return result.stdout.strip() == "PONG"


def start_postgres() -> None:
    if not postgres_ready():
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start"], check=False)
    wait_until(postgres_ready, 60, "PostgreSQL to accept connections", 0.2)


def start_redis() -> None:
    if not redis_ready():
        subprocess.run(REDIS_START, check=False)
    wait_until(redis_ready, 30, "Redis to answer", 0.1)


@pytest.fixture
def services_restored() -> Iterator[None]:
    """Whatever the test does to PostgreSQL and Redis, both run again when it ends."""
    yield
    start_redis()
    start_postgres()
    from django.db import connections

    connections.close_all()


def log_messages(proc: Proc) -> list[str]:
    """The messages of a worker's log lines (JSON lines: their "message"; other lines as they are)."""
    messages = []
    for line in proc.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            messages.append(line)
            continue
        messages.append(str(record.get("message", "")) if isinstance(record, dict) else line)
    return messages


def task_results(task: str, *procs: Proc) -> list[str]:
    """The return values (as logged) of every ``task`` the workers finished."""
    results = []
    for proc in procs:
        for message in log_messages(proc):
            match = re.search(re.escape(task) + r"\[[\w-]+\] succeeded in [\d.e-]+s: (.*)$", message)
            if match:
                results.append(match.group(1))
    return results


def worker_results(*procs: Proc) -> Counter[str]:
    """How often each ``runs.execute_step`` outcome appears in the workers' logs."""
    return Counter(value.strip("'") for value in task_results("runs.execute_step", *procs))
