"""The error object a failed task holds."""

from __future__ import annotations

from kaiju_tasks import task_error
from kaiju_tasks.rpc import protocol


def test_an_error_holds_code_message_stage_and_reason():
    error = task_error.build(protocol.TIMEOUT, "too slow", stage=2, reason="timeout")
    assert error == {"code": -32004, "message": "too slow", "stage": 2, "reason": "timeout"}
    assert list(error) == ["code", "message", "stage", "reason"]


def test_an_error_without_a_stage_leaves_it_to_the_store():
    error = task_error.build(protocol.CANCELLED, "Task cancelled", reason="cancelled")
    assert error == {"code": -32006, "message": "Task cancelled", "reason": "cancelled"}


def test_stage_zero_is_a_stage():
    assert task_error.build(1, "m", stage=0, reason="error")["stage"] == 0


def test_remote_error_data_is_kept_when_given():
    error = task_error.build(-32000, "boom", stage=0, reason="error", data={"why": [1]})
    assert error["data"] == {"why": [1]}
    assert "data" not in task_error.build(-32000, "boom", stage=0, reason="error")
