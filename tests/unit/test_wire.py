"""The JSON-ready shape services return rows in."""

from __future__ import annotations

from datetime import UTC, datetime

from kaiju_tasks import wire


def test_timestamps_become_iso_text_and_other_values_stay():
    at = datetime(2030, 1, 1, tzinfo=UTC)
    row = {"id": "t", "created": at, "result": [1], "next_run": None}
    assert wire.json_ready(row) == {
        "id": "t",
        "created": "2030-01-01T00:00:00+00:00",
        "result": [1],
        "next_run": None,
    }


def test_only_the_columns_asked_for_are_returned_in_that_order():
    row = {"id": "t", "status": "IDLE", "stage": 0}
    assert list(wire.json_ready(row, ["stage", "id"]).items()) == [("stage", 0), ("id", "t")]
