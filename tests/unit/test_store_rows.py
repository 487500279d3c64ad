"""The typed rows the store returns name exactly the columns of their tables."""

from __future__ import annotations

from typing import get_type_hints

from kaiju_tasks.store import base, tables


def test_a_task_row_has_every_column_of_the_tasks_table_and_no_other():
    # TaskRow is written out by hand (a TypedDict); a column added to the table must be added
    # to it too, or the engine reads a key its type says does not exist.
    assert set(get_type_hints(base.TaskRow)) == {c.name for c in tables.tasks.columns}
