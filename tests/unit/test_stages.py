"""The stage-kind registry: each kind validates, calls or parks, and renders; unknown kinds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kaiju_tasks import errors, models, stages

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ROW: dict[str, Any] = {"exec_deadline": NOW + timedelta(seconds=300), "max_exec_timeout": 300}


def refused(build: Any, *args: Any, **kwargs: Any) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        build(*args, **kwargs)
    return info.value


def test_the_registry_holds_call_timer_and_message_named_by_their_models_tag():
    assert list(stages.KINDS) == ["call", "timer", "message"]
    for name, kind in stages.KINDS.items():
        assert kind.name == name
        assert kind.model.model_fields["kind"].default == name
    assert set(stages.PARKING_KINDS) == {"timer", "message"}
    assert set(stages.TAGS) == {"call", "timer", "message", "legacy_timer", "legacy_message"}


@pytest.mark.parametrize(
    ("stored", "model"),
    [
        ({"method": "orders.list", "params": {"n": 1}}, stages.TaskCommand),
        ({"kind": "call", "method": "orders.list"}, stages.TaskCommand),
        ({"kind": "timer", "seconds": 5}, stages.Timer),
        ({"kind": "message", "max_timeout": 60}, stages.Message),
        ({"method": "_TIMER_", "params": {"timer": 5}}, stages.Timer),
        ({"method": "_MESSAGE_"}, stages.Message),
    ],
)
def test_each_kind_validates_with_its_model(stored, model):
    (command,) = models.parse_commands([stored])
    assert type(command) is model
    assert stages.KINDS[command.kind].model is model


@pytest.mark.parametrize(
    ("stored", "field"),
    [
        ({"method": ""}, "commands.0.method"),
        ({"kind": "timer"}, "commands.0.seconds"),
        ({"kind": "timer", "seconds": models.Limit.MAX_T + 1}, "commands.0.seconds"),
        ({"kind": "message", "seconds": 5}, "commands.0.seconds"),
    ],
)
def test_a_kinds_model_refuses_bad_fields_by_name(stored, field):
    error = refused(models.parse_commands, [stored])
    assert [e["field"] for e in error.errors] == [field]


def test_an_unknown_kind_is_refused_with_an_error_naming_the_command():
    error = refused(models.Task, commands=[{"method": "m"}, {"kind": "teleport", "to": "x"}])
    assert [e["field"] for e in error.errors] == ["commands.1"]
    assert "TaskCommand, Timer, Message" in error.message
    assert refused(models.parse_commands, [{"kind": "teleport"}]).field == "commands.0"
    assert stages.find("teleport") is None
    assert stages.find(None) is None


def test_a_call_takes_a_slot_and_calls_its_method_while_timers_and_messages_park():
    assert stages.CALL.park is None
    assert stages.TIMER.park is not None
    assert stages.MESSAGE.park is not None
    assert stages.TIMER.park(ROW, {"kind": "timer", "seconds": 7.5}, NOW) == NOW + timedelta(
        seconds=7.5
    )


def test_a_message_parks_until_its_max_timeout_or_the_task_deadline_whichever_is_sooner():
    park = stages.MESSAGE.park
    assert park is not None
    assert park(ROW, {"kind": "message", "max_timeout": 60}, NOW) == NOW + timedelta(seconds=60)
    assert park(ROW, {"kind": "message", "max_timeout": 900}, NOW) == ROW["exec_deadline"]
    assert park(ROW, {"kind": "message", "max_timeout": None}, NOW) == ROW["exec_deadline"]
    by_hand = {"exec_deadline": None, "max_exec_timeout": 30}  # a row written by hand
    assert park(by_hand, {"kind": "message"}, NOW) == NOW + timedelta(seconds=30)


def test_stage_deadline_names_the_limit_that_ends_the_stage():
    assert stages.stage_deadline(ROW, {"max_timeout": 2}, NOW) == (
        NOW + timedelta(seconds=2),
        "stage max_timeout (2 s)",
    )
    assert stages.stage_deadline(ROW, {}, NOW) == (
        ROW["exec_deadline"],
        "task deadline (max_exec_timeout 300 s)",
    )


@pytest.mark.parametrize(
    ("stored", "kind"),
    [
        ({"kind": "call", "method": "m"}, stages.CALL),
        ({"method": "m"}, stages.CALL),
        ({"kind": "timer", "seconds": 1}, stages.TIMER),
        ({"kind": "message"}, stages.MESSAGE),
        ({"kind": "teleport"}, stages.CALL),  # a row written by hand: it fails as a call would
    ],
)
def test_the_executor_runs_a_stored_command_as_its_kind_and_anything_else_as_a_call(stored, kind):
    assert stages.of_stored(stored) is kind


@pytest.mark.parametrize(
    ("stored", "label"),
    [
        ({"kind": "call", "method": "orders.list", "params": None}, "orders.list"),
        ({"method": "[kws.method]"}, "[kws.method]"),
        ({"kind": "timer", "seconds": 100}, "timer, 100 s"),
        ({"kind": "timer", "seconds": 2.5}, "timer, 2.5 s"),
        ({"kind": "message", "max_timeout": None}, "message"),
        ({"kind": "message", "max_timeout": 60}, "message, waits up to 60 s"),
    ],
)
def test_each_kind_renders_its_label(stored, label):
    assert stages.label(stored) == label


def test_only_a_call_shows_its_params_as_written_and_evaluated_and_only_a_message_takes_one():
    assert (stages.CALL.label_is_code, stages.CALL.shown, stages.CALL.templated) == (
        True,
        ("params",),
        ("method", "params"),
    )
    for kind in (stages.TIMER, stages.MESSAGE):
        assert (kind.label_is_code, kind.shown, kind.templated) == (False, (), ())
    assert [k.name for k in stages.KINDS.values() if k.takes_message] == ["message"]


def test_a_stage_of_an_unknown_kind_is_labelled_as_unknown_not_as_another_kind():
    assert stages.kind_of({"kind": "teleport"}) is None
    assert stages.label({"kind": "teleport"}) == "unknown stage kind 'teleport'"
    assert stages.label({"kind": 5}) == "unknown stage kind '5'"
    assert stages.kind_of(["not", "a", "stage"]) is None
    assert stages.label(["not", "a", "stage"]) == "not a stage (list)"


def test_a_kinds_label_refuses_a_stored_command_missing_what_it_shows():
    with pytest.raises(KeyError):
        stages.label({"kind": "timer"})


def test_timers_count_against_the_task_deadline_through_their_kind():
    assert stages.TIMER.waits is not None
    assert stages.TIMER.waits(stages.Timer(40)) == 40
    error = refused(
        models.Task, commands=[{"kind": "timer", "seconds": 40}] * 2, max_exec_timeout=60
    )
    assert error.field == "max_exec_timeout"
    assert "timers total 80 s" in error.message


def test_only_templated_fields_are_checked_for_reads_of_later_stages():
    error = refused(models.Task, commands=[{"method": "m", "params": "[1.x]"}, {"method": "m"}])
    assert error.field == "commands.0.params"
    # A message or timer holds no templates: a condition reading later stages is not a template
    models.Task(commands=[{"kind": "message", "condition": {"1.x": 1}}, {"method": "m"}])
