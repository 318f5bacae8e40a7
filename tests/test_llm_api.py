"""The LLM router's rows in the REST API and the admin: providers (keys only as credential aliases)
and token budgets, scoped to the caller's tenant."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from agents.llm import breaker
from agents.models import Credential, LLMProvider, TokenBudget
from tests.conftest import api_client_for

API = "/api/v1"

pytestmark = pytest.mark.django_db


def test_providers_crud_in_the_callers_tenant(owner_api, outsider_api, tenants):
    credential = Credential(tenant_id="acme", alias="openai-key", kind="bearer")
    credential.set_secret("sk-never-shown")
    credential.save()
    body = {
        "name": "openai",
        "base_url": "https://api.openai.com/v1",
        "model": "gpt-4o-mini",
        "credential_alias": "openai-key",
        "priority": 20,
        "tags": ["planning"],
    }

    created = owner_api.post(f"{API}/llm-providers", body, format="json")

    assert created.status_code == 201, created.content
    data = created.json()
    assert data["kind"] == "openai" and data["enabled"] is True and data["circuit"] == "closed"
    assert "sk-never-shown" not in created.content.decode()
    row = LLMProvider.objects.get(pk=data["id"])
    assert row.tenant_id == "acme" and row.credential_alias == "openai-key"
    # another tenant sees nothing and gets a 404 for the row
    assert outsider_api.get(f"{API}/llm-providers").json() == []
    assert outsider_api.get(f"{API}/llm-providers/{row.pk}").status_code == 404
    assert outsider_api.delete(f"{API}/llm-providers/{row.pk}").status_code == 404
    # the circuit shows when every worker skips it
    breaker.record_failure("tenant:acme:openai", "HTTP 429", retry_after=90)
    assert owner_api.get(f"{API}/llm-providers/{row.pk}").json()["circuit"].startswith("open for")
    assert owner_api.patch(f"{API}/llm-providers/{row.pk}", {"enabled": False}, format="json").status_code == 200
    assert LLMProvider.objects.get(pk=row.pk).enabled is False


@pytest.mark.parametrize(
    "change, field",
    [
        ({"base_url": "ftp://x/v1"}, "base_url"),
        ({"credential_alias": "globex-key"}, "credential_alias"),  # another tenant's credential
        ({"kind": "anthropic"}, "kind"),
        ({"tags": "planning"}, "tags"),
        ({"priority": 5000}, "priority"),
    ],
)
def test_bad_provider_fields_are_400_naming_the_field(owner_api, tenants, change, field):
    other = Credential(tenant_id="globex", alias="globex-key", kind="bearer")
    other.set_secret("x")
    other.save()
    body = {"name": "p", "base_url": "https://h.example/v1", "model": "m", **change}
    response = owner_api.post(f"{API}/llm-providers", body, format="json")
    assert response.status_code == 400 and field in response.json()["errors"]
    assert not LLMProvider.objects.exists()


def test_duplicate_provider_name_is_400(owner_api, tenants):
    body = {"name": "p", "base_url": "https://h.example/v1", "model": "m"}
    assert owner_api.post(f"{API}/llm-providers", body, format="json").status_code == 201
    assert owner_api.post(f"{API}/llm-providers", body, format="json").status_code == 400


def test_budgets_crud_counts_read_only(owner_api, outsider_api, viewer, tenants):
    created = owner_api.post(
        f"{API}/token-budgets", {"period": "day", "limit": 50000, "policy": "wait", "used": 999}, format="json"
    )
    assert created.status_code == 201, created.content
    data = created.json()
    assert (data["used"], data["reserved"], data["remaining"]) == (0, 0, 50000)
    assert data["resets_at"]
    duplicate = owner_api.post(f"{API}/token-budgets", {"period": "day", "limit": 1}, format="json")
    assert duplicate.status_code == 400 and "period" in duplicate.json()["errors"]
    assert owner_api.post(f"{API}/token-budgets", {"period": "week", "limit": 1}, format="json").status_code == 400
    assert owner_api.post(f"{API}/token-budgets", {"period": "month", "limit": 0}, format="json").status_code == 400
    assert outsider_api.get(f"{API}/token-budgets").json() == []
    assert outsider_api.get(f"{API}/token-budgets/{data['id']}").status_code == 404
    viewer_api = api_client_for(viewer)
    assert viewer_api.get(f"{API}/token-budgets").status_code == 200
    assert viewer_api.patch(f"{API}/token-budgets/{data['id']}", {"limit": 1}, format="json").status_code == 403
    assert TokenBudget.objects.get(pk=data["id"]).tenant_id == "acme"


def test_admin_pages_of_providers_budgets_and_circuits(client, tenants):
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(root)
    LLMProvider.objects.create(tenant_id="acme", name="local", base_url="http://127.0.0.1:8080/v1", model="m")
    TokenBudget.objects.create(tenant_id="acme", period="day", limit=100, used=40)
    breaker.record_failure("deployment:local", "HTTP 429", retry_after=60)

    for path in ("/admin/agents/llmprovider/", "/admin/agents/tokenbudget/", "/admin/agents/llmcircuit/"):
        assert client.get(path).status_code == 200, path
    assert "60" in client.get("/admin/agents/tokenbudget/").content.decode()  # remaining

    circuit = breaker._model().objects.get(key="deployment:local")
    client.post("/admin/agents/llmcircuit/", {"action": "close", "_selected_action": [circuit.pk]})
    assert breaker.blocked_for("deployment:local") == 0.0
