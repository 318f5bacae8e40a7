"""Verbs other apps call: load workflow files into versioned templates, find a template."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from .errors import TemplateNotFound, WorkflowError, did_you_mean
from .models import WorkflowTemplate

#: The templates shipped with the platform.
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class LoadResult:
    """What loading one file did: ``action`` is "created", "updated" (new version) or "unchanged"."""

    template: WorkflowTemplate
    action: str


def save_template(
    spec: dict[str, Any], source: str, source_path: str = "", tenant_id: str = "default", generated: bool = False
) -> LoadResult:
    """Store ``spec`` as the newest version of its key in ``tenant_id`` unless the same source is already there.

    ``generated``: the version was written by workflow generation (``WorkflowTemplate.generated``).

    Idempotent: the sha256 of ``source`` is compared with the latest version's; a change makes
    version N+1 (older versions stay, runs keep pointing at theirs). Keys are per tenant.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()
    key = spec["key"]
    # the columns' limits: refused with a message rather than failing the INSERT
    for field, value, limit in (
        ("key", key, 200),
        ("name", spec.get("name") or "", 200),
        ("category", spec.get("category") or "", 100),
    ):
        if len(str(value)) > limit:
            raise WorkflowError(f"{field}: longer than {limit} characters", source=source_path or "<string>")
    for _ in range(3):  # two loaders racing on one key: the loser retries with the next number
        latest = WorkflowTemplate.objects.filter(tenant_id=tenant_id, key=key).order_by("-version").first()
        if latest is not None and latest.content_hash == digest:
            if not latest.is_active:
                latest.is_active = True
                latest.save(update_fields=["is_active"])
            return LoadResult(latest, "unchanged")
        try:
            with transaction.atomic():
                template = WorkflowTemplate.objects.create(
                    key=key,
                    version=(latest.version + 1) if latest else 1,
                    name=spec.get("name") or key,
                    description=spec.get("description") or "",
                    category=spec.get("category") or "",
                    variables=spec.get("variables") or {},
                    spec=spec,
                    source=source,
                    source_path=source_path,
                    content_hash=digest,
                    trigger=spec.get("trigger") or {},
                    tenant_id=tenant_id,
                    generated=generated,
                )
        except IntegrityError:
            continue
        return LoadResult(template, "updated" if latest else "created")
    raise WorkflowError(f"{source_path or key}: could not save a new version (concurrent loads)")


def load_template_file(path: str | Path, tenant_id: str = "default") -> LoadResult:
    """Validate and store one workflow file. Raises WorkflowError (one line) and saves nothing."""
    from .spec import load_spec

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read: {exc.strerror or exc}") from None
    limit = settings.ORCHESTRATOR_MAX_SPEC_BYTES
    if len(raw) > limit:
        raise WorkflowError(f"{path}: file is {len(raw)} bytes, larger than the {limit} byte limit")
    spec = load_spec(raw, source=str(path))
    return save_template(spec, raw.decode("utf-8"), source_path=str(path), tenant_id=tenant_id)


def workflow_files(directory: str | Path) -> list[Path]:
    """The YAML files directly inside ``directory``, sorted. Raises WorkflowError if it is not a folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WorkflowError(f"{directory}: not a directory")
    return sorted(p for p in directory.iterdir() if p.suffix in YAML_SUFFIXES and p.is_file())


def load_directory(directory: str | Path, tenant_id: str = "default") -> list[LoadResult]:
    """Load every workflow file of a folder; all files are validated before any is saved."""
    from .spec import load_spec

    files = workflow_files(directory)
    for path in files:  # validate all first: one bad file saves nothing
        load_spec(path.read_bytes(), source=str(path))
    with transaction.atomic():
        return [load_template_file(path, tenant_id=tenant_id) for path in files]


def load_builtin_templates(tenant_id: str = "default") -> list[LoadResult]:
    """Load (or refresh) the builtin templates shipped in ``templates_app/builtin`` into ``tenant_id``."""
    return load_directory(BUILTIN_DIR, tenant_id=tenant_id)


def get_template(key: str, version: int | None = None, tenant_id: str = "default") -> WorkflowTemplate:
    """The given version of ``key`` in ``tenant_id``, or its latest active version. Raises TemplateNotFound
    (a WorkflowError) if none, suggesting the closest key of the tenant."""
    qs = WorkflowTemplate.objects.filter(tenant_id=tenant_id, key=key)
    if version is not None:
        template = qs.filter(version=version).first()
        if template is None:
            raise TemplateNotFound(f"template '{key}' has no version {version}")
        return template
    template = qs.filter(is_active=True).order_by("-version").first()
    if template is None:
        known = WorkflowTemplate.objects.filter(tenant_id=tenant_id, is_active=True).values_list("key", flat=True)
        hint = did_you_mean(key, known) or " (load it with `manage.py load_templates`)"
        raise TemplateNotFound(f"no template with key '{key}'{hint}")
    return template
