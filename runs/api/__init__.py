"""The REST API under ``/api/v1/``: templates, runs, their steps, attempts and traces, and the
seed-compatible endpoints (``/workflows``, ``/dispatch``). Views are thin: scoping in
``runs.tenancy``, side effects in ``runs.services``."""
