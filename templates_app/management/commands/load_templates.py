"""``manage.py load_templates [DIR ...]``: load the builtin templates and folders of YAML files."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from runs.management.commands._cli import ensure_embedded_database, fail_input
from templates_app.errors import WorkflowError
from templates_app.services import load_builtin_templates, load_directory


class Command(BaseCommand):
    help = (
        "Load the builtin workflow templates and every *.yaml/*.yml file of the given folders "
        "(and ORCHESTRATOR_TEMPLATE_DIRS). Idempotent: a changed file becomes a new version."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("dirs", nargs="*", help="folders of workflow YAML files")
        parser.add_argument("--tenant", default="default", help="slug of the tenant the templates belong to")

    def handle(self, *args, **options) -> None:
        ensure_embedded_database()
        try:
            tenant = options["tenant"]
            results = load_builtin_templates(tenant_id=tenant)
            for directory in [*settings.ORCHESTRATOR_TEMPLATE_DIRS, *options["dirs"]]:
                results += load_directory(directory, tenant_id=tenant)
        except WorkflowError as exc:
            fail_input(self.stderr, str(exc))
        for result in results:
            t = result.template
            self.stdout.write(f"{result.action:<9} {t.key} v{t.version}  ({t.source_path})")
