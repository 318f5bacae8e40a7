"""Which providers a call may use, in which order (seed 000 "LLM Configuration").

Deployment providers, from settings:

- ``local`` (or ``primary`` when the URL is not loopback): ``ORCHESTRATOR_LLM_BASE_URL``
  (``LLM_BASE_URL``), model ``ORCHESTRATOR_LLM_MODEL`` (``LLM_MODEL``), key
  ``ORCHESTRATOR_LLM_API_KEY`` (``LLM_API_KEY``), kind ``ORCHESTRATOR_LLM_KIND``; priority 10.
- ``fallback-1``, ``fallback-2``...: ``ORCHESTRATOR_LLM_FALLBACK_URLS``, same model and key;
  priorities 20, 21...
- ``gemini``: when ``GEMINI_API_KEY`` is set and ``GEMINI_ENABLED`` is not false, Gemini's
  OpenAI-compatible endpoint (``GEMINI_BASE_URL``) with ``GEMINI_MODEL``; priority 50.

Tenant providers: the tenant's enabled :class:`agents.models.LLMProvider` rows (their own priority,
default 10; their key is a credential alias of the tenant).

Every provider whose host is loopback (``localhost``, 127.0.0.0/8, ``::1``) gets priority 0 and the
tag ``planning``, as seed 000 says. Order: by priority, then tenant rows (by name) before the
deployment's (as configured); a call that names a ``tag`` tries the providers carrying it first,
the others after them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.conf import settings

from orchestrator_site.conf import conf

__all__ = ["Provider", "configured", "deployment_providers", "is_loopback", "providers_for"]

#: Tag given to loopback providers (seed 000: "tagged for planning/pattern-analysis tasks").
PLANNING = "planning"


@dataclass(frozen=True)
class Provider:
    """One OpenAI-compatible endpoint.

    Attributes:
        name: ``local``, ``fallback-1``, ``gemini``, or a tenant provider's name.
        base_url: the API root (``http://127.0.0.1:8080/v1``).
        model: the model asked for.
        kind: ``openai`` or ``llamacpp`` (structured-output dialect).
        priority: lower is tried first.
        tags: e.g. ``("planning",)``.
        source: ``deployment``, ``tenant``, or ``step`` (an ``llm`` step's own ``base_url``).
        api_key_setting: deployment providers: the Django setting holding the key ("" = none).
        credential_alias: tenant providers: the tenant credential holding the key ("" = none).
        tenant_id: tenant providers: the owner.
    """

    name: str
    base_url: str
    model: str
    kind: str = "openai"
    priority: int = 10
    tags: tuple[str, ...] = ()
    source: str = "deployment"
    api_key_setting: str = field(default="", repr=False)
    credential_alias: str = field(default="", repr=False)
    tenant_id: str = ""

    @property
    def breaker_key(self) -> str:
        """The key of this provider's circuit breaker row (``agents.models.LLMCircuit``)."""
        if self.source == "tenant":
            return f"tenant:{self.tenant_id}:{self.name}"[:255]
        if self.source == "step":
            return f"step:{self.base_url.rstrip('/')}"[:255]
        return f"deployment:{self.name}"


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is ``localhost`` or a loopback address."""
    try:
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_loopback_rule(provider: Provider) -> Provider:
    if not is_loopback(provider.base_url):
        return provider
    tags = provider.tags if PLANNING in provider.tags else (*provider.tags, PLANNING)
    return Provider(**{**provider.__dict__, "priority": 0, "tags": tags})


def deployment_providers() -> list[Provider]:
    """The providers configured by settings, each with the loopback rule applied (unsorted)."""
    model = conf.llm_model or "default"
    kind = conf.llm_kind or "openai"
    found: list[Provider] = []
    seen: set[str] = set()
    main = (conf.llm_base_url or "").strip()
    if main:
        name = "local" if is_loopback(main) else "primary"
        found.append(Provider(name, main, model, kind, 10, api_key_setting="ORCHESTRATOR_LLM_API_KEY"))
        seen.add(main.rstrip("/"))
    fallbacks = conf.llm_fallback_urls or []
    if isinstance(fallbacks, str):
        fallbacks = fallbacks.split(",")
    for index, url in enumerate(u.strip() for u in fallbacks if u and u.strip()):
        if url.rstrip("/") in seen:
            continue
        seen.add(url.rstrip("/"))
        found.append(
            Provider(
                f"fallback-{index + 1}", url, model, "openai", 20 + index, api_key_setting="ORCHESTRATOR_LLM_API_KEY"
            )
        )
    if getattr(settings, "GEMINI_API_KEY", "") and getattr(settings, "GEMINI_ENABLED", False):
        found.append(
            Provider(
                "gemini",
                getattr(settings, "GEMINI_BASE_URL", ""),
                getattr(settings, "GEMINI_MODEL", "") or "gemini-2.0-flash",
                "openai",
                50,
                api_key_setting="GEMINI_API_KEY",
            )
        )
    return [_with_loopback_rule(p) for p in found]


def tenant_providers(tenant_id: str) -> list[Provider]:
    """The tenant's enabled LLMProvider rows as providers (loopback rule applied, unsorted)."""
    from ..models import LLMProvider

    rows = LLMProvider.objects.filter(tenant_id=tenant_id, enabled=True)
    return [
        _with_loopback_rule(
            Provider(
                name=row.name,
                base_url=row.base_url,
                model=row.model,
                kind=row.kind,
                priority=row.priority,
                tags=tuple(str(t) for t in (row.tags or []) if isinstance(t, str)),
                source="tenant",
                credential_alias=row.credential_alias,
                tenant_id=row.tenant_id,
            )
        )
        for row in rows
    ]


def providers_for(tenant_id: str, tag: str | None = None) -> list[Provider]:
    """Every provider ``tenant_id`` may use, in the order to try (see the module docstring)."""
    tenant = sorted(tenant_providers(tenant_id), key=lambda p: p.name)
    providers = tenant + deployment_providers()

    def order(item: tuple[int, Provider]) -> tuple[int, int, int]:
        index, p = item
        tagged = 0 if (tag is None or tag in p.tags) else 1
        # ties keep the configured order: tenant rows (by name), then the deployment's as listed
        return (tagged, p.priority, index)

    return [p for _, p in sorted(enumerate(providers), key=order)]


def configured(tenant_id: str) -> bool:
    """True when at least one provider exists for the tenant (no call is made)."""
    return bool(deployment_providers()) or bool(tenant_providers(tenant_id))
