#!/usr/bin/env python3
"""A reference external executor: takes steps of its queues over HTTP and reports them (seed 001).

Standard library only, so it reads as the protocol and ports to any language:

1. ``POST /api/v1/executors/poll`` {"queues", "executor_id", "max_tasks", "lease_seconds"} ->
   {"tasks": [{"step", "lease_token", "params", "type", "idempotency_key", ...}]}
2. while working, ``POST /api/v1/executors/steps/<step>/heartbeat`` {"lease_token",
   "lease_seconds"} every third of the lease (a 409 means the lease was lost: stop, the step may
   already run elsewhere);
3. ``.../complete`` {"lease_token", "output", "duration_ms"} (task_done) or ``.../fail``
   {"lease_token", "error", "retryable"} (task_failed).

The work this one knows: params ``{"sleep": seconds}`` waits that long, ``{"fail": "message"}``
fails (``"retryable": false`` to fail for good), and the output echoes the params. Replace
``work()`` with yours.

Usage: executor.py --url http://127.0.0.1:8000 --token exe_... --queue gpu [--lease 30] [--once]
Exit: 0 after --once or SIGTERM, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any


class LeaseLost(Exception):
    """The platform refused a report: the lease passed (the step may run elsewhere)."""


class Client:
    """JSON over HTTP with the executor's bearer token."""

    def __init__(self, url: str, token: str) -> None:
        self.base = url.rstrip("/") + "/api/v1/executors"
        self.token = token

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                raise LeaseLost(exc.read().decode(errors="replace")) from None
            raise


def work(task: dict[str, Any], stop: threading.Event) -> Any:
    """Do one task's work; return its output or raise RuntimeError (its message is the error)."""
    params = task.get("params") or {}
    if isinstance(params, dict) and params.get("fail"):
        raise RuntimeError(str(params["fail"]))
    seconds = float(params.get("sleep", 0)) if isinstance(params, dict) else 0.0
    if stop.wait(seconds):
        raise RuntimeError("executor stopping")
    return {"echo": params, "attempt": task["attempt"], "idempotency_key": task["idempotency_key"]}


def run_task(client: Client, task: dict[str, Any], lease: float, stop: threading.Event) -> None:
    step, token = task["step"], task["lease_token"]
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(lease / 3):
            try:
                client.post(f"/steps/{step}/heartbeat", {"lease_token": token, "lease_seconds": lease})
            except LeaseLost:
                return
            except OSError:
                continue  # the platform away for a moment: the next beat tries again

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    started = time.monotonic()
    try:
        output = work(task, stop)
    except RuntimeError as exc:
        retryable = not (isinstance(task.get("params"), dict) and task["params"].get("retryable") is False)
        report = ("fail", {"lease_token": token, "error": str(exc), "retryable": retryable})
    else:
        report = ("complete", {"lease_token": token, "output": output})
    finally:
        done.set()
    report[1]["duration_ms"] = int((time.monotonic() - started) * 1000)
    try:
        client.post(f"/steps/{step}/{report[0]}", report[1])
    except LeaseLost as exc:
        print(f"step {step}: report refused ({exc})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--lease", type=float, default=30.0, help="lease seconds asked for each step")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between empty polls")
    parser.add_argument("--once", action="store_true", help="stop after the first task")
    args = parser.parse_args(argv)
    client = Client(args.url, args.token)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    executor_id = f"{socket.gethostname()}:{__import__('os').getpid()}"
    while not stop.is_set():
        try:
            tasks = client.post(
                "/poll",
                {"queues": args.queue, "executor_id": executor_id, "max_tasks": 1, "lease_seconds": args.lease},
            )["tasks"]
        except (OSError, urllib.error.HTTPError) as exc:
            print(f"poll failed: {exc}", file=sys.stderr, flush=True)
            stop.wait(args.poll_interval)
            continue
        if not tasks:
            stop.wait(args.poll_interval)
            continue
        for task in tasks:
            print(f"step {task['step']} ({task['step_id']}, attempt {task['attempt']})", flush=True)
            run_task(client, task, args.lease, stop)
        if args.once:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
