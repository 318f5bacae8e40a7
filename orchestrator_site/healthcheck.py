"""Container healthchecks (docker-compose.yml): ``python -m orchestrator_site.healthcheck web|beat``.

- ``web``: ``GET http://127.0.0.1:<port>/health`` answers 200 within 5 s (the port of
  ``ORCHESTRATOR_WEB_BIND``, default 8000).
- ``beat``: the sweeper's beat entry (``orchestrator-sweep``) was sent within ``--max-age``
  seconds (default 600: django-celery-beat saves ``last_run_at`` every 3 minutes).

Exit code 0 healthy, 1 not (the reason on stderr). Workers are checked with
``celery -A orchestrator_site inspect ping`` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request


def check_web() -> str | None:
    port = os.environ.get("ORCHESTRATOR_WEB_BIND", "0.0.0.0:8000").rsplit(":", 1)[-1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:  # noqa: S310
            return None if response.status == 200 else f"/health answered {response.status}"
    except OSError as exc:
        return f"/health: {exc}"


def check_beat(max_age: float) -> str | None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")
    django.setup()
    from django.utils import timezone
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.filter(name="orchestrator-sweep").first()
    if task is None or task.last_run_at is None:
        return "beat has not sent orchestrator-sweep yet"
    age = (timezone.now() - task.last_run_at).total_seconds()
    return None if age <= max_age else f"orchestrator-sweep last sent {age:.0f} s ago (> {max_age:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator_site.healthcheck")
    parser.add_argument("process", choices=["web", "beat"])
    parser.add_argument("--max-age", type=float, default=600.0, help="beat: seconds (default 600)")
    args = parser.parse_args(argv)
    problem = check_web() if args.process == "web" else check_beat(args.max_age)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
