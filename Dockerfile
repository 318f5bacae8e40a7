# One image for every process of docker-compose.yml: migrate (one-shot), web (gunicorn), worker,
# worker-system and beat. Build: `docker build -t orchestrator .` (docker compose builds it).
# tests/test_deploy.py runs the RUN steps below in a fresh virtualenv, as far as a machine
# without docker allows.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=orchestrator_site.settings \
    ORCHESTRATOR_DATA_DIR=/var/lib/orchestrator \
    ORCHESTRATOR_STATIC_ROOT=/app/static

# bubblewrap: the exec steps' sandbox (namespaces); nothing else from Debian
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
# static files (admin, Swagger UI) collected at build time; the key is only for this step
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --no-input -v 0
RUN useradd --system --uid 10001 --home-dir /var/lib/orchestrator --create-home orchestrator && \
    mkdir -p /var/lib/orchestrator && chown -R orchestrator /var/lib/orchestrator

USER orchestrator
EXPOSE 8000
CMD ["gunicorn", "orchestrator_site.wsgi"]
