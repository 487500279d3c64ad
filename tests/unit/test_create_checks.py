"""Checks made when a task is created: stage references, the original wire format."""

from __future__ import annotations

import pytest

from kaiju_tasks import errors, models


def refused(**task) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        models.Task(**task)
    return info.value


def test_a_template_reading_a_stage_that_has_not_run_is_refused_at_create():
    error = refused(commands=[{"method": "a"}, {"method": "b", "params": {"x": "[5.foo]"}}])
    assert error.field == "commands.1.params"
    assert "reads the result of stage 5, which has not run when stage 1 starts" in error.message
    own = refused(commands=[{"method": "a", "params": {"x": "[!f:id-{0.id}]"}}])
    assert own.field == "commands.0.params"
    method = refused(commands=[{"method": "[!x:lower:1.name]"}, {"method": "b"}])
    assert method.field == "commands.0.method"


def test_templates_reading_earlier_stages_or_with_defaults_are_accepted():
    task = models.Task(
        commands=[
            {"method": "a"},
            {"kind": "message"},
            {
                "method": "b",
                "params": {
                    "earlier": "[0.id]",
                    "message": "[!e:1.count + 1]",
                    "later_with_default": "[7.x:0]",
                    "later_through_default": "[!x:default:4.x:none]",
                    "data": "[kws.mode]",
                },
            },
        ]
    )
    assert len(task.commands) == 3


def test_an_update_of_commands_is_checked_the_same_way():
    current = models.Task(id="t", commands=[{"method": "a"}]).model_dump()
    with pytest.raises(errors.ValidationError) as info:
        models.check_merged(current, {"commands": [{"method": "a", "params": "[3.x]"}]})
    assert info.value.field == "commands.0.params"


def test_the_original_wire_format_of_timer_and_message_is_accepted():
    task = models.Task(
        commands=[
            {"method": "_TIMER_", "params": {"timer": 5}},
            {"method": "_MESSAGE_"},
            {"method": "_MESSAGE_", "params": {}, "max_timeout": 60},
            {"method": "work"},
        ]
    )
    stored = [command.to_json() for command in task.commands]
    assert stored[0] == {"condition": None, "kind": "timer", "seconds": 5}
    assert stored[1] == {"condition": None, "kind": "message", "max_timeout": None}
    assert stored[2]["max_timeout"] == 60
    assert stored[3]["method"] == "work"


@pytest.mark.parametrize(
    ("command", "field", "message"),
    [
        ({"method": "_TIMER_"}, "commands.0", "needs params {'timer': seconds}"),
        ({"method": "_TIMER_", "params": {"timer": 0}}, "commands.0.seconds", "greater than 0"),
        ({"method": "_MESSAGE_", "params": {"x": 1}}, "commands.0", "takes no params"),
    ],
)
def test_malformed_original_stages_name_the_field(command, field, message):
    error = refused(commands=[command])
    assert error.field == field
    assert message in error.message
