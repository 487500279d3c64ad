"""Every bound on user input holds in the pure parts: templates, conditions, list filters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from kaiju_tasks import conditions, config, errors, limits, templates
from kaiju_tasks.store import tables


@contextlib.contextmanager
def configured(**changes: int) -> Iterator[limits.Limits]:
    before = limits.active()
    applied = limits.Limits(**{**_fields(before), **changes})
    limits.configure(applied)
    try:
        yield applied
    finally:
        limits.configure(before)


def _fields(value: limits.Limits) -> dict[str, int]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


def refused(call, *args, **kwargs) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        call(*args, **kwargs)
    return info.value


# --- templates ----------------------------------------------------------------------------------


def test_a_long_expression_is_refused_when_validated_naming_the_limit():
    # 1,100 terms used to reach the executor and fail there with a RecursionError.
    template = "[!e:" + "*".join(["2"] * 1_100) + "]"
    error = refused(templates.validate, {"x": template}, "commands.0.params")
    assert error.field == "commands.0.params.x"
    assert "expression_terms (256)" in error.message
    assert len(error.message) < 400  # the template is quoted cut short, not whole


def test_expressions_nested_in_one_another_cannot_exhaust_the_stack():
    # Each expression is legal alone; nested 10 deep they would recurse 1,200 levels.
    template = "1"
    for _ in range(10):
        template = "[!e:" + template + "+1" * 120 + "]"
    error = refused(templates.validate, template)
    assert "nested too deeply: more than 288 levels" in error.message
    shallow = "[!e:" + "+".join(["[!e:" + "+".join(["1"] * 100) + "]"] * 50) + "]"
    assert templates.render(shallow, {}) == 100 * 50
    chain = "[!e:" * 40 + "1" + "]" * 40
    assert "template_nesting" in refused(templates.validate, chain).message


def test_a_long_template_nested_deeply_is_refused_before_it_is_parsed():
    template = "[!x:min:" + ":".join(["[" * 30 + "a" + "]" * 30] * 200) + "]"
    error = refused(templates.validate, template)
    assert "too complex to parse" in error.message
    assert "65,536" in error.message


def test_a_function_takes_at_most_expression_terms_arguments():
    template = "[!x:min:" + ":".join(["1"] * 300) + "]"
    assert (
        "more than expression_terms (256) arguments"
        in refused(templates.validate, template).message
    )


def test_one_request_parses_a_bounded_number_of_new_template_nodes():
    templates._CACHE.clear()
    with templates.parse_allowance(50):
        templates.validate({"a": "[x.y]", "b": "[!f:{x}-{y}]"})
        templates.validate({"a": "[x.y]"})  # parsed before: costs nothing
        error = refused(templates.validate, {"c": "[!x:min:" + ":".join(["[a]"] * 40) + "]"})
    assert "request_template_nodes (50 nodes)" in error.message
    templates.validate({"c": "[!x:min:" + ":".join(["[b]"] * 40) + "]"})  # no allowance set


def test_a_template_longer_than_template_chars_is_refused():
    template = "[!f:" + "a" * (limits.active().template_chars + 1) + "]"
    error = refused(templates.validate, template, "params")
    assert "template_chars (16,384)" in error.message
    assert len(error.message) < 400


@pytest.mark.parametrize(
    "template",
    [
        "[!e:" + "+".join(["kws.s"] * 120) + "]",  # strings joined with +
        "[!f:" + "{kws.s}" * 120 + "]",  # text formatted
        "[!x:join:`,`:kws.many]",  # a list joined
        "[!e:" + "+".join(["kws.list"] * 120) + "]",  # lists joined with +
        "[!x:str:kws.big]",  # a large value as text
    ],
)
def test_no_rendered_value_grows_past_rendered_bytes(template):
    s = "a" * 10_000
    data = {
        "kws": {
            "s": s,
            "many": [s] * 120,
            "list": [s] * 10,
            "big": {"k": [s] * 120},
        }
    }
    error = refused(templates.render, {"text": template}, data)
    assert error.field == "params.text"
    assert "rendered_bytes (1 MiB)" in error.message


def test_many_references_to_one_large_value_count_toward_the_rendered_size():
    # Each "[kws.s]" is the same string object, but the params would be 120 copies on the wire.
    data = {"kws": {"s": "a" * 10_000}}
    params = {f"p{i}": "[kws.s]" for i in range(120)}
    assert "rendered_bytes" in refused(templates.render, params, data).message
    assert templates.render({"p": "[kws.s]"}, data) == {"p": "a" * 10_000}


def test_rendering_stops_after_eval_steps_of_work():
    data = {"kws": {"a": list(range(20_000)), "b": list(range(20_000))}}
    template = "[!e:" + " and ".join(["kws.a == kws.b"] * 60) + "]"
    error = refused(templates.render, template, data)
    assert "eval_steps (100,000 steps)" in error.message
    with configured(eval_steps=10_000_000):
        assert templates.render(template, data) is True  # 1.2 million steps


def test_the_parse_cache_is_bounded_by_the_characters_it_holds():
    with configured(template_cache_bytes=64 * 1024):
        templates._CACHE.clear()
        for i in range(2_000):
            templates.parse(f"[!f:{i}-" + "x" * 500 + "]")
        assert templates._CACHE.size <= 64 * 1024
        big = "[!f:" + "y" * 5_000 + "]"  # over a 64th of the bound: parsed, never kept
        templates.parse(big)
        assert templates._CACHE.get(big) is None
    templates._CACHE.clear()


# --- conditions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)+$", "(.*a){20}$", "^(a?){25}a{25}$"])
def test_catastrophic_patterns_match_in_linear_time(pattern):
    text = "a" * 200_000 + "!"
    # Python's backtracking engine takes years on these; RE2 answers at once.
    # The text ends in "!": none of them matches (a backtracking engine never gets to say so).
    assert conditions.evaluate({"x": {"match": pattern}}, {"x": text}) is False
    assert conditions.evaluate({"x": {"match": "[p]"}}, {"x": text, "p": pattern}) is False


def test_like_with_many_wildcards_on_a_large_text_completes():
    pattern = "%a_" * 80 + "%b"
    assert conditions.evaluate({"x": {"like": pattern}}, {"x": "a" * 500_000}) is False


def test_a_condition_evaluation_is_bounded_by_eval_steps():
    big = list(range(50_000))
    spec = [{"x": {"eq": "[y]"}}] * 200  # 200 comparisons of two 50,000-item lists
    error = refused(conditions.evaluate, spec, {"x": big, "y": [*big[:-1], -1]})
    assert "eval_steps" in error.message


def test_a_regex_too_large_once_compiled_is_refused():
    with configured(regex_memory=64 * 1024):
        error = refused(conditions.Condition, {"x": {"match": ".{1000}" * 4}})
    assert error.field == "condition.x.match"
    assert "invalid regular expression" in error.message


def test_conditions_nested_deeper_than_condition_depth_are_refused():
    spec: dict[str, object] = {}
    for _ in range(40):
        spec = {"not": spec}
    error = refused(conditions.Condition, spec)
    assert "condition_depth (32 levels)" in error.message


# --- list filters -------------------------------------------------------------------------------


def test_a_list_filter_nested_600_times_is_refused_naming_the_field():
    value: dict[str, object] = {"eq": "QUEUED"}
    for _ in range(600):
        value = {"not": value}
    error = refused(tables.compile_conditions, tables.tasks, {"status": value})
    assert str(error.field).startswith("conditions.status.not.not")
    assert "condition_depth (32 levels)" in error.message


def test_a_list_filter_with_more_values_than_condition_values_is_refused():
    many = [{"id": [f"t{i}-{j}" for j in range(1_000)]} for i in range(33)]
    error = refused(tables.compile_conditions, tables.tasks, many)
    assert error.field == "conditions"
    assert "condition_values (10,000)" in error.message


# --- configuration ------------------------------------------------------------------------------


def test_limits_are_set_in_the_limits_section_and_must_be_positive(tmp_path):
    settings, sources = config.load(
        paths=[], environ={"KAIJU_TASKS_LIMITS_STAGE_RESULT_BYTES": "2048"}
    )
    assert settings.limits.stage_result_bytes == 2048
    assert sources["limits.stage_result_bytes"] == "env KAIJU_TASKS_LIMITS_STAGE_RESULT_BYTES"
    with pytest.raises(errors.ConfigError, match=r"\[limits\] reply_bytes must be at least 1"):
        config.load(paths=[], environ={"KAIJU_TASKS_LIMITS_REPLY_BYTES": "0"})
    with pytest.raises(errors.ConfigError, match="unknown option"):
        config.load(paths=[], environ={"KAIJU_TASKS_LIMITS_NOPE": "1"})


# --- what an attacker tried after the limits were in place -------------------------------------


def test_explaining_a_missing_path_draws_from_the_budget():
    # 150 nested lists around 20,000 empty lists: the explanation re-walked every level.
    value: object = [*[[]] * 20_000, 0]
    for _ in range(150):
        value = [value]
    error = refused(templates.render, {"text": "[kws.a.k]"}, {"kws": {"a": value}})
    assert "eval_steps" in error.message


def test_condition_paths_mapping_over_lists_draw_from_the_budget():
    spec = [{"kws.a.k": 1}] * 300
    error = refused(conditions.evaluate, spec, {"kws": {"a": [0] * 100_000}})
    assert "eval_steps" in error.message


def test_comparing_two_large_objects_charges_their_keys():
    a = {f"k{i}": 0 for i in range(35_000)}
    b = {**{f"k{i}": 0 for i in range(34_999)}, "other": 0}
    template = "[!e:" + " or ".join(["kws.a == kws.b"] * 60) + "]"
    assert "eval_steps" in refused(templates.render, template, {"kws": {"a": a, "b": b}}).message


def test_changing_the_case_of_non_ascii_text_costs_more_than_copying_it():
    data = {"kws": {"s": "İ" * 450_000}}
    params = {f"p{i}": "[!x:len:[!x:lower:kws.s]]" for i in range(20)}
    assert "eval_steps" in refused(templates.render, params, data).message
    assert templates.render("[!x:len:[!x:lower:kws.s]]", {"kws": {"s": "a" * 450_000}}) == 450_000


def _peak_bytes(call, *args) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        call(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_walking_long_keys_over_long_lists_copies_no_name_per_item():
    from kaiju_tasks.rpc import calls

    deep: object = [0] * 60_000
    for level in range(400):
        deep = {f"{level:03d}" + "k" * 97: deep}
    # The check for lone surrogates, and a list filter's bounds: memory in proportion to the
    # payload (it was gigabytes: every item carried a copy of its whole dotted name).
    assert _peak_bytes(calls.bad_unicode, deep) < 20 * 2**20
    wide = {"k" * 200_000: [0] * 9_000}
    assert _peak_bytes(tables.check_bounds, wide) < 20 * 2**20
    assert _peak_bytes(templates.validate, {"k" * 340_000: [0] * 330_000}) < 20 * 2**20


def test_a_lone_surrogate_deep_inside_is_named_by_its_path():
    from kaiju_tasks.rpc import calls

    assert calls.bad_unicode({"a": [{"b": "ok"}, {"c\ud800": 1}]}) == "a.1.c\\ud800"


def test_a_cron_expression_that_never_fires_is_refused():
    error = refused(models_task, cron="0 0 31 2 *")
    assert error.field == "cron"
    assert "never fires" in error.message


def models_task(**fields):
    from kaiju_tasks import models

    return models.Task(commands=[{"method": "m"}], **fields)


def test_template_errors_quote_user_text_short_and_without_secrets():
    data = {"kws": {"b": "\x7f" * 900_000, "u": "postgresql://app:S3cretPW@db/prod?sslkey=K3Y"}}
    error = refused(templates.render, {"x": "[kws.[kws.b]]"}, data)
    assert len(error.message) < 1_000
    for template in ("[kws.[kws.u]]", "[!x:timestamp:kws.u]"):
        error = refused(templates.render, {"x": template}, data)
        assert "S3cretPW" not in error.message
        assert "K3Y" not in error.message
