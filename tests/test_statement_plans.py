"""The indexes a completion's statements rely on (docs/engine.md, "Statements that find their rows
by key"). Which plan PostgreSQL picks depends on the tables' statistics (the bad plans showed on a
bench database never analyzed); what a test can pin is that no index offers the bad one.
PostgreSQL only.
"""

from __future__ import annotations

import pytest
from django.db import connection


@pytest.fixture
def postgres():
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements and partial indexes of PostgreSQL")


@pytest.mark.django_db
def test_the_parent_index_holds_map_children_only(postgres):
    """An index holding every top-level step (parent NULL) was a plan for ``parent_id IS NULL``
    that read the whole table at each completion."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE tablename = 'runs_step' AND indexdef LIKE '%%(parent_id)%%'"
        )
        indexes = cursor.fetchall()
    assert [name for name, _ in indexes] == ["step_parent_idx"], indexes
    assert indexes[0][1].endswith("WHERE (parent_id IS NOT NULL)"), indexes
