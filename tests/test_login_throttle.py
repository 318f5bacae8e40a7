"""Sign-in throttles (runs/api/throttling.py): the API's token login and the admin's login form.

The counts live in Django's cache, which in these tests (CELERY_BROKER_URL is Redis) is Redis, as
in production: a second process sees the wrong passwords the first one counted. Each test signs
in as a user name and from a client address of its own, so counts left in Redis by an earlier
run or another test cannot interfere.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid

import pytest
from django.core.cache import caches
from rest_framework.test import APIClient

API = "/api/v1"


def basic(username: str, password: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def random_address() -> str:
    octets = uuid.uuid4().bytes[:3]
    return f"10.{octets[0]}.{octets[1]}.{octets[2] % 250 + 1}"


@pytest.fixture
def user(db):
    from django.contrib.auth import get_user_model

    name = f"throttled-{uuid.uuid4().hex[:10]}"
    return get_user_model().objects.create_user(username=name, password="right-password")


def test_the_cache_is_redis_when_the_broker_is(settings):
    # production: counts shared by every gunicorn worker; no Redis: the memory cache
    expected = "RedisCache" if settings.CELERY_BROKER_URL.startswith("redis://") else "LocMemCache"
    assert type(caches["default"]).__name__ == expected


def test_forty_wrong_passwords_then_the_right_one_gets_no_token(user):
    client = APIClient()
    codes = []
    for attempt in range(40):
        # a different address for every attempt: the per-user-name count still stops the guesser
        response = client.post(
            f"{API}/auth/login", REMOTE_ADDR=random_address(), **basic(user.username, f"wrong-{attempt}")
        )
        codes.append(response.status_code)
    assert codes[:10] == [401] * 10 and set(codes[10:]) == {429}
    response = client.post(f"{API}/auth/login", REMOTE_ADDR=random_address(), **basic(user.username, "right-password"))
    assert response.status_code == 429
    assert "token" not in response.json() and int(response["Retry-After"]) > 0


def test_right_passwords_do_not_count_against_the_user(user):
    client = APIClient()
    for _ in range(12):
        address = random_address()
        assert (
            client.post(f"{API}/auth/login", REMOTE_ADDR=address, **basic(user.username, "right-password")).status_code
            == 200
        )


def test_one_address_spraying_many_user_names_is_stopped(db):
    address = random_address()
    client = APIClient()
    codes = [
        client.post(
            f"{API}/auth/login", REMOTE_ADDR=address, **basic(f"nobody-{i}-{uuid.uuid4().hex[:6]}", "x")
        ).status_code
        for i in range(31)
    ]
    assert codes[:30] == [401] * 30 and codes[30] == 429


def test_forged_forwarded_for_does_not_give_a_fresh_address(db):
    address = random_address()
    client = APIClient()
    codes = [
        client.post(
            f"{API}/auth/login",
            REMOTE_ADDR=address,
            HTTP_X_FORWARDED_FOR=random_address(),
            **basic(f"nobody-{uuid.uuid4().hex[:8]}", "x"),
        ).status_code
        for _ in range(31)
    ]
    assert codes[-1] == 429


@pytest.mark.skipif(not os.environ.get("CELERY_BROKER_URL", "").startswith("redis://"), reason="needs the Redis cache")
def test_wrong_passwords_counted_in_another_process_are_seen_here(user):
    # Given another process (a second gunicorn worker) that received ten wrong passwords ...
    script = "\n".join(
        [
            "import base64, os, sys, django",
            "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'orchestrator_site.settings')",
            "django.setup()",
            "from django.test import RequestFactory",
            "from runs.api.throttling import LoginFailureThrottle",
            "auth = 'Basic ' + base64.b64encode(sys.argv[1].encode() + b':bad').decode()",
            "request = RequestFactory().post('/api/v1/auth/login', HTTP_AUTHORIZATION=auth)",
            "for _ in range(10): LoginFailureThrottle().record_failure(request)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run([sys.executable, "-c", script, user.username], check=True, env=env, timeout=120)
    # ... this process refuses even the right password
    response = APIClient().post(
        f"{API}/auth/login", REMOTE_ADDR=random_address(), **basic(user.username, "right-password")
    )
    assert response.status_code == 429


def test_admin_login_form_is_throttled_too(user, client):
    user.is_staff = True
    user.save()
    for attempt in range(10):
        response = client.post(
            "/admin/login/", {"username": user.username, "password": f"wrong-{attempt}"}, REMOTE_ADDR=random_address()
        )
        assert response.status_code == 200  # the form again, with its error
    response = client.post(
        "/admin/login/", {"username": user.username, "password": "right-password"}, REMOTE_ADDR=random_address()
    )
    assert response.status_code == 429 and "_auth_user_id" not in client.session
