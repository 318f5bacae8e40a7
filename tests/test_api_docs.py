"""Offline API docs and JSON errors: Swagger UI at /api/v1/docs is served from our own static files
(drf-spectacular-sidecar: no CDN), and every error under /api/ is JSON, including the ones Django
answers itself (an unknown path, a crash outside a DRF view)."""

from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import path

from orchestrator_site import api_errors
from orchestrator_site.urls import urlpatterns as site_urlpatterns
from tests.conftest import api_client_for

pytestmark = pytest.mark.django_db

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def test_swagger_ui_references_no_external_url_and_its_assets_are_served():
    client = Client()
    response = client.get("/api/v1/docs")
    assert response.status_code == 200
    page = response.content.decode()
    assert not re.search(r"""["'(]\s*(?:https?:)?//""", page), "the page loads something from another host"
    assert "cdn" not in page.lower()
    assets = ASSET.findall(page)
    scripts = [url for url in assets if url.endswith(".js")]
    assert any(url.endswith("swagger-ui-bundle.js") for url in scripts), assets
    assert any(url.endswith("swagger-ui.css") for url in assets), assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200, url
        body = b"".join(asset.streaming_content) if asset.streaming else asset.content
        if url.endswith(".js"):
            assert "javascript" in asset["Content-Type"], (url, asset["Content-Type"])
            assert b"SwaggerUI" in body, url  # the real bundle, not an error page
    # the schema the page loads is ours and answers
    assert client.get("/api/v1/schema?format=json").json()["info"]["title"] == "Orchestrator API"


def test_schema_declares_token_authentication():
    schema = Client().get("/api/v1/schema?format=json").json()
    schemes = schema["components"]["securitySchemes"]
    assert any(s.get("type") == "apiKey" and s.get("name") == "Authorization" for s in schemes.values()), schemes


@pytest.mark.parametrize("url", ["/api/v1/nope", "/api/v1/nope/", "/api/v1/runs/x/y/z", "/api/v2/runs", "/api/"])
def test_unknown_api_paths_are_json_404(url, owner):
    for client in (Client(), api_client_for(owner)):
        for method in ("get", "post", "delete"):
            response = getattr(client, method)(url)
            assert response.status_code == 404, (method, url)
            assert response["Content-Type"] == "application/json"
            assert response.json() == {"detail": f"not found: {url}"}


def test_outside_the_api_django_pages_stay():
    response = Client().get("/admin/nope/")
    assert response.status_code in (302, 404)
    assert response["Content-Type"].startswith("text/html")


def test_method_not_allowed_is_json(owner):
    response = api_client_for(owner).delete("/api/v1/me")
    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": 'Method "DELETE" not allowed.'}


# A crash outside a DRF view: this module is the URLconf of the next test.
def _crash(request):
    raise RuntimeError("boom")


urlpatterns = [path("api/v1/crash", _crash), *site_urlpatterns]
handler404 = api_errors.handler404
handler500 = api_errors.handler500


def test_a_crash_outside_drf_is_a_json_500_under_api(settings):
    settings.ROOT_URLCONF = __name__
    client = Client(raise_request_exception=False, HTTP_X_REQUEST_ID="req-500-check")
    response = client.get("/api/v1/crash")
    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "internal error (request id req-500-check)"}


def test_misspelled_template_key_gets_a_suggestion_in_the_api(owner, chain_template):
    response = api_client_for(owner).post("/api/v1/runs", {"template": "chian", "variables": {"n": 1}}, format="json")
    assert response.status_code in (400, 404)
    assert response.json()["detail"].endswith("no template with key 'chian' (did you mean 'chain'?)")
