"""The bench workloads on the embedded default: SQLite, memory broker, worker threads in-process.

Run by ``bench/run.py`` (its "embedded default" column) in a process of its own, with
``BENCH_DATABASE_URL=sqlite:///...`` and ``CELERY_BROKER_URL=memory://``; prints each wall and
writes ``{workload: [seconds, ...]}`` to ``--json``. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import run_platform, truncate  # noqa: E402 - sets the environment first
from bench.shapes import WORKLOADS, Workload, workflow_yaml  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from runs.embedded import embedded_worker
    from templates_app.spec import load_spec

    assert settings.ORCHESTRATOR_EMBEDDED, "bench/embedded.py needs CELERY_BROKER_URL=memory://"
    call_command("migrate", verbosity=0)
    wanted = {n for n in args.only.split(",") if n}
    walls: dict[str, list[float]] = {}
    with embedded_worker(concurrency=settings.ORCHESTRATOR_EMBEDDED_CONCURRENCY):
        warm = Workload("warm-up", "", "chain:3", runs=20)
        run_platform(warm, load_spec(workflow_yaml(warm), source="warm.yaml"))
        truncate()
        for workload in WORKLOADS:
            if wanted and workload.name not in wanted:
                continue
            spec = load_spec(workflow_yaml(workload), source=f"{workload.name}.yaml")
            for rep in range(args.reps):
                wall, _done = run_platform(workload, spec)
                truncate()
                walls.setdefault(workload.name, []).append(wall)
                print(f"{workload.name} rep {rep + 1}: embedded default {wall:.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(walls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
