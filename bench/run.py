"""Benchmark: the platform against raw Celery on the same broker, same shapes, same worker count.

    python bench/run.py                   # every workload, 3 repetitions each
    python bench/run.py --only W1,W2 --reps 5
    python bench/run.py --py-spy var/profiles   # also record the platform worker (collapsed stacks)

What it does: creates (or reuses) the PostgreSQL database ``orchestrator_bench`` and migrates it;
starts one platform worker (``celery -A orchestrator_site worker -P prefork -c 2``: two worker
processes) and one raw worker (``celery -A bench.rawtasks worker -P prefork -c 2``), each on its
own queue of the same Redis broker; then for every workload and repetition runs the platform and
raw Celery back to back. Wall time is from just before the first run is submitted (submission is
included) to the finish of the last step (``Run.finished_at`` for the platform, the time the last
raw sink task recorded). Between repetitions the bench tables are truncated, so every repetition
starts from the same state. Peak RSS is the largest sum, sampled every 50 ms, of the resident
memory of a worker's master and pool processes.

Settings: ``BENCH_DATABASE_URL`` (default ``postgres://postgres@127.0.0.1:5432/orchestrator_bench``;
the database name must contain "bench": its tables are truncated), ``CELERY_BROKER_URL`` (default
``redis://127.0.0.1:6379/0``). Nothing here is a test: figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/orchestrator_bench"
os.environ["DATABASE_URL"] = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB)
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
os.environ["ORCHESTRATOR_QUEUE"] = f"bench-platform-{os.getpid()}"
os.environ["BENCH_RAW_QUEUE"] = f"bench-raw-{os.getpid()}"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
os.environ.setdefault("ORCHESTRATOR_LOG_LEVEL", "WARNING")

import psutil  # noqa: E402
import redis  # noqa: E402

from bench.shapes import WORKLOADS, Workload, graph, workflow_yaml  # noqa: E402

POLL = 0.05  # seconds between two "finished yet?" checks (walls come from recorded finish times)


# --- processes ----------------------------------------------------------------------------------


def ensure_database(url: str) -> None:
    """Create the bench database if missing (connecting to the server's ``postgres`` database)."""
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(url)
    name = cfg["NAME"]
    if "bench" not in name:
        raise SystemExit(f"refusing to use database {name!r}: the bench truncates tables; its name must say bench")
    host, port, user = cfg["HOST"] or "127.0.0.1", cfg["PORT"] or 5432, cfg["USER"] or "postgres"
    dsn = f"host={host} port={port} user={user} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def start_worker(app: str, queue: str, concurrency: int, log_path: Path) -> subprocess.Popen:
    """A ``celery worker`` in its own process group, logging at WARNING (no per-task log lines).

    Readiness is proven by the warm-up round that follows, not by the log.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "prefork", "-c", str(concurrency)]
        + ["-Q", queue, "-n", f"{queue}@%h", "-l", "WARNING", "--without-gossip", "--without-mingle"]
        + ["--without-heartbeat"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    time.sleep(1)
    if proc.poll() is not None:
        raise SystemExit(f"worker {app} did not start:\n{log_path.read_text()[-3000:]}")
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RssSampler:
    """Samples the resident memory (MB) of each worker tree every 50 ms; keeps the peak per label."""

    def __init__(self, procs: dict[str, subprocess.Popen]) -> None:
        self.procs = {label: psutil.Process(p.pid) for label, p in procs.items()}
        self.label: str | None = None
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def tree_rss(self, side: str) -> float:
        master = self.procs[side]
        total = 0
        for proc in [master, *master.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total / 1e6

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            label = self.label
            if label is None:
                continue
            side = label.split("/", 1)[1]
            try:
                value = self.tree_rss(side)
            except psutil.Error:
                continue
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)

    def stop(self) -> None:
        self._stop.set()


class CpuMeter:
    """CPU seconds spent during one repetition, split by who spent them: the worker tree under
    test, PostgreSQL's processes, Redis, and the rest of the machine (this script's polling, the
    other worker idling, the kernel). Read from ``/proc`` through psutil (user + system time);
    the machine-wide total is ``psutil.cpu_times()`` (all CPUs, idle and iowait excluded)."""

    GROUPS = ("worker", "postgres", "redis", "rest")

    def __init__(self, worker: subprocess.Popen) -> None:
        self.worker = psutil.Process(worker.pid)

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(v for k, v in t._asdict().items() if k not in ("idle", "iowait", "guest", "guest_nice"))

    def _by_pid(self) -> dict[int, tuple[str, float]]:
        """CPU seconds so far of each process of a named group: {pid: (group, seconds)}."""
        tree = {p.pid for p in [self.worker, *self.worker.children(recursive=True)]}
        seen: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["name"]):
            group = (
                "worker" if proc.pid in tree
                else "postgres" if proc.info["name"] == "postgres"
                else "redis" if (proc.info["name"] or "").startswith("redis-server")
                else None
            )  # fmt: skip
            if group is None:
                continue
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            seen[proc.pid] = (group, t.user + t.system)
        return seen

    def start(self) -> None:
        self._t0, self._p0 = self._busy(), self._by_pid()

    def stop(self) -> dict[str, float]:
        """Seconds per group since :meth:`start`, summed over the processes alive at the end (a
        process that exits in between, such as an autovacuum worker, counts in "rest", as does
        whatever ran outside the three named groups)."""
        busy = self._busy() - self._t0
        out = {"worker": 0.0, "postgres": 0.0, "redis": 0.0}
        for pid, (group, seconds) in self._by_pid().items():
            out[group] += max(0.0, seconds - self._p0.get(pid, (group, 0.0))[1])
        out["rest"] = max(0.0, busy - sum(out.values()))
        return out


# --- one repetition -----------------------------------------------------------------------------


def truncate() -> None:
    from django.db import connection

    from runs.models import Attempt, Run, Step, Trace

    if connection.vendor != "postgresql":  # the embedded default (bench/embedded.py)
        for model in (Trace, Attempt, Step, Run):
            model.objects.all()._raw_delete(connection.alias)
        return
    tables = ", ".join(m._meta.db_table for m in (Trace, Attempt, Step, Run))
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} CASCADE")


def run_platform(workload: Workload, spec: dict) -> tuple[float, int]:
    """Submit ``workload.runs`` runs and wait; returns (wall seconds, steps that succeeded)."""
    from django.db.models import Max

    from runs import engine
    from runs.choices import RUN_ACTIVE, StepStatus
    from runs.models import Run, Step

    key = f"bench-{uuid.uuid4().hex[:12]}"
    inputs = {"items": list(range(workload.for_each))} if workload.for_each else {}
    started = time.time()
    if workload.runs > 1:  # the batch path: all the runs in one transaction (POST /api/v1/runs/batch)
        engine.start_runs(spec, [{"inputs": inputs, "correlation_id": key}] * workload.runs)
    else:
        engine.start_run(spec, inputs, correlation_id=key)
    deadline = time.time() + 900
    active = Run.objects.filter(correlation_id=key, status__in=list(RUN_ACTIVE))
    while active.exists():
        if time.time() > deadline:
            raise SystemExit(f"{workload.name}: platform runs did not finish in 900 s")
        time.sleep(POLL)
    runs = Run.objects.filter(correlation_id=key)
    bad = runs.exclude(status="succeeded").values_list("status", "error")[:3]
    if bad:
        raise SystemExit(f"{workload.name}: platform runs failed: {list(bad)}")
    finished = runs.aggregate(last=Max("finished_at"))["last"].timestamp()
    done = Step.objects.filter(run__correlation_id=key, status=StepStatus.SUCCEEDED).count()
    return finished - started, done


def run_raw(workload: Workload, r: redis.Redis) -> tuple[float, int]:
    """The same shape as raw Celery tasks; returns (wall seconds, tasks run)."""
    from bench import rawtasks

    g = graph(workload.shape)
    key = f"bench:{uuid.uuid4().hex[:12]}"
    done_key = f"{key}:done"
    expected = workload.runs * len(g.sinks)
    started = time.time()
    for i in range(workload.runs):
        rawtasks.send(workload.shape, f"{key}:{i}", done_key, g.roots)
    deadline = time.time() + 900
    while int(r.get(done_key) or 0) < expected:
        if time.time() > deadline:
            raise SystemExit(f"{workload.name}: raw runs did not finish in 900 s")
        time.sleep(POLL)
    finished = float(r.get(f"{done_key}:last"))
    keys = list(r.scan_iter(match=f"{key}:*", count=1000))
    for i in range(0, len(keys), 1000):
        r.delete(*keys[i : i + 1000])
    return finished - started, workload.steps


# --- reporting ----------------------------------------------------------------------------------


@dataclass
class Result:
    workload: Workload
    platform: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    rss_platform: float = 0.0
    rss_raw: float = 0.0
    embedded: list[float] = field(default_factory=list)
    cpu_platform: list[dict[str, float]] = field(default_factory=list)  # CpuMeter, one per repetition
    cpu_raw: list[dict[str, float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.platform) / statistics.median(self.raw)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def embedded_cell(res: Result) -> str:
    if not res.embedded:
        return "-"
    seconds = statistics.median(res.embedded)
    return f"{spread(res.embedded)} ({seconds / statistics.median(res.raw):.2f})"


def run_embedded(names: list[str], reps: int, concurrency: int) -> dict[str, list[float]]:
    """The same workloads on the embedded default (bench/embedded.py in a process of its own:
    SQLite, memory broker, a thread-pool worker inside the process). Returns walls by workload."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-embedded-") as folder:
        out = Path(folder) / "walls.json"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
        env.update(ORCHESTRATOR_DATA_DIR=folder, BENCH_DATABASE_URL=f"sqlite:///{folder}/bench.sqlite3")
        env.update(CELERY_BROKER_URL="memory://localhost/", ORCHESTRATOR_EMBEDDED_CONCURRENCY=str(concurrency))
        cmd = [sys.executable, str(ROOT / "bench" / "embedded.py"), "--only", ",".join(names), "--reps", str(reps)]
        done = subprocess.run([*cmd, "--json", str(out)], env=env, cwd=ROOT)
        if done.returncode != 0 or not out.exists():
            print("embedded default: failed (see above)", flush=True)
            return {}
        return json.loads(out.read_text())


def table(results: list[Result]) -> str:
    head = (
        "| workload | steps | platform s, median (min-max) | raw Celery s, median (min-max) | "
        "platform steps/s | raw steps/s | ratio | peak RSS platform / raw (MB) | embedded default s (ratio) |"
    )
    lines = [head, "|" + "---|" * 9]
    for res in results:
        w = res.workload
        lines.append(
            f"| {w.name} {w.title} | {w.steps} | {spread(res.platform)} | {spread(res.raw)} | "
            f"{w.steps / statistics.median(res.platform):.0f} | {w.steps / statistics.median(res.raw):.0f} | "
            f"{res.ratio:.2f} | {res.rss_platform:.0f} / {res.rss_raw:.0f} | {embedded_cell(res)} |"
        )
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    """CPU milliseconds per step (median over repetitions), by process group (CpuMeter)."""
    groups = CpuMeter.GROUPS
    head = "| workload | side | total | " + " | ".join(groups) + " |"
    lines = [head, "|" + "---|" * (3 + len(groups))]
    for res in results:
        for side, samples in (("platform", res.cpu_platform), ("raw Celery", res.cpu_raw)):
            if not samples:
                continue
            per = {g: statistics.median(s[g] for s in samples) * 1000 / res.workload.steps for g in groups}
            cells = " | ".join(f"{per[g]:.2f}" for g in groups)
            lines.append(f"| {res.workload.name} | {side} | {sum(per.values()):.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per workload (default 3)")
    parser.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes per side (default 2)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    parser.add_argument("--py-spy", default="", help="record the platform worker with py-spy into this folder")
    parser.add_argument(
        "--no-embedded", action="store_true", help="skip the embedded default's row (SQLite, in-process worker)"
    )
    args = parser.parse_args(argv)

    ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from templates_app.spec import load_spec

    call_command("migrate", verbosity=0)
    truncate()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    workloads = [w for w in WORKLOADS if not wanted or w.name in wanted]
    logs = ROOT / "var" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    platform = start_worker("orchestrator_site", settings.CELERY_TASK_DEFAULT_QUEUE, args.concurrency, logs / "p.log")
    raw = start_worker("bench.rawtasks", os.environ["BENCH_RAW_QUEUE"], args.concurrency, logs / "raw.log")
    sampler = RssSampler({"platform": platform, "raw": raw})
    meters = {"platform": CpuMeter(platform), "raw": CpuMeter(raw)}
    r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    results: list[Result] = []
    try:
        # Warm up both sides (imports, connections, first-use caches); not measured.
        warm = Workload("warm-up", "", "chain:3", runs=20)
        run_platform(warm, load_spec(workflow_yaml(warm), source="warm.yaml"))
        run_raw(warm, r)
        truncate()
        for workload in workloads:
            spec = load_spec(workflow_yaml(workload), source=f"{workload.name}.yaml")
            res = Result(workload)
            spy = None
            if args.py_spy:
                Path(args.py_spy).mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen(
                    ["py-spy", "record", "--subprocesses", "--format", "raw", "--rate", "200", "--pid"]
                    + [str(platform.pid), "-o", str(Path(args.py_spy) / f"{workload.name}.txt")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            for rep in range(args.reps):
                sampler.label = f"{workload.name}/platform"
                meters["platform"].start()
                wall, done = run_platform(workload, spec)
                res.cpu_platform.append(meters["platform"].stop())
                assert done == workload.steps + (1 if workload.for_each else 0), (workload.name, done)
                res.platform.append(wall)
                sampler.label = f"{workload.name}/raw"
                meters["raw"].start()
                res.raw.append(run_raw(workload, r)[0])
                res.cpu_raw.append(meters["raw"].stop())
                sampler.label = None
                truncate()
                print(
                    f"{workload.name} rep {rep + 1}: platform {res.platform[-1]:.2f} s, raw {res.raw[-1]:.2f} s",
                    flush=True,
                )
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            res.rss_platform = sampler.peaks.get(f"{workload.name}/platform", 0.0)
            res.rss_raw = sampler.peaks.get(f"{workload.name}/raw", 0.0)
            results.append(res)
    finally:
        sampler.stop()
        stop_worker(platform)
        stop_worker(raw)
        for queue in (settings.CELERY_TASK_DEFAULT_QUEUE, os.environ["BENCH_RAW_QUEUE"]):
            r.delete(queue)

    if not args.no_embedded:
        embedded = run_embedded([res.workload.name for res in results], args.reps, args.concurrency)
        for res in results:
            res.embedded = embedded.get(res.workload.name, [])
    print()
    print(f"{args.concurrency} worker processes per side, {args.reps} repetitions, {os.cpu_count()} CPUs")
    print(table(results))
    print("\nCPU ms per step, by process (worker: the side's worker tree; rest: this script's polling,")
    print("the other side's idle worker, the kernel):\n")
    print(cpu_table(results))
    by_name = {res.workload.name: res for res in results}
    if "W5" in by_name and "W5-1k" in by_name:
        growth = statistics.median(by_name["W5"].platform) / statistics.median(by_name["W5-1k"].platform)
        print(f"\nW5 / W5-1k (10x the items): {growth:.1f}x the time (target: at most 12x)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    res.workload.name: {
                        "steps": res.workload.steps,
                        "platform_s": res.platform,
                        "raw_s": res.raw,
                        "ratio": res.ratio,
                        "rss_platform_mb": res.rss_platform,
                        "rss_raw_mb": res.rss_raw,
                    }
                    for res in results
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
