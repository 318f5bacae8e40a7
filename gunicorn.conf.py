"""gunicorn settings of the web process, read by ``gunicorn orchestrator_site.wsgi`` (from this
folder, or ``-c gunicorn.conf.py``): docker-compose's ``web`` and the README's production section.

Environment (defaults in brackets): ``ORCHESTRATOR_WEB_BIND`` [0.0.0.0:8000],
``ORCHESTRATOR_WEB_WORKERS`` [2 x CPUs + 1, at most 8; gunicorn's ``WEB_CONCURRENCY`` is read
too], ``ORCHESTRATOR_WEB_THREADS`` [1], ``ORCHESTRATOR_WEB_TIMEOUT`` [60 s]. Logs: gunicorn's own
lines and one access record per request go through the platform's JSON formatter on stderr
(``ORCHESTRATOR_LOG_LEVEL``, ``ORCHESTRATOR_LOG_FORMAT``), like web requests, workers and beat.
"""

from __future__ import annotations

import os

from orchestrator_site.env import env_int, env_str
from orchestrator_site.logging import build_logging_config

bind = env_str("ORCHESTRATOR_WEB_BIND", "0.0.0.0:8000")
workers = env_int("ORCHESTRATOR_WEB_WORKERS", env_int("WEB_CONCURRENCY", min(2 * (os.cpu_count() or 1) + 1, 8)))
threads = env_int("ORCHESTRATOR_WEB_THREADS", 1)
timeout = env_int("ORCHESTRATOR_WEB_TIMEOUT", 60)
graceful_timeout = 30
# the platform's JSON lines, for gunicorn's own logger and its access log
logconfig_dict = build_logging_config(
    env_str("ORCHESTRATOR_LOG_LEVEL", "WARNING").upper(),
    env_str("ORCHESTRATOR_LOG_FORMAT", "json").lower(),
    gunicorn=True,
)
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
