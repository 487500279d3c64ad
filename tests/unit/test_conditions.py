from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiju_tasks import conditions, errors
from kaiju_tasks.conditions import Condition

DATA = {
    "id": "my_task",
    "kws": {
        "mode": "full",
        "name": "report-2030.csv",
        "tags": ["a", "b"],
        "opts": {"dry": False, "x": 1},
        "empty": None,
        "n": 5,
        "flag": True,
        "ratio": 0.5,
        "allowed": ["full", "fast"],
    },
    "executor": {"id": "ex-1"},
    "0": {"count": 3, "status": "ok", "data": [{"id": "001"}, {"id": "005"}]},
}


def holds(spec, data=DATA, **kwargs) -> bool:
    result = Condition(spec).evaluate(data, **kwargs)
    assert result is conditions.evaluate(spec, data, **kwargs)
    return result


def invalid(spec) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        Condition(spec)
    return info.value


# --- the user guide -----------------------------------------------------------------------------


def test_guide_condition_gt_zero_holds_when_the_previous_stage_updated_items():
    condition = Condition({"0.count": {"gt": 0}})
    assert condition.evaluate({"0": {"count": 1000}}) is True


def test_guide_condition_gt_zero_fails_when_nothing_was_updated():
    condition = Condition({"0.count": {"gt": 0}})
    assert condition.evaluate({"0": {"count": 0}}) is False


def test_guide_condition_compares_with_a_template_from_an_earlier_stage():
    condition = Condition({"1.count": {"gt": "[0.cache.update_threshold]"}})
    settings_result = {"cache": {"update_threshold": 42}}
    assert condition.evaluate({"0": settings_result, "1": {"count": 1000}}) is True
    assert condition.evaluate({"0": settings_result, "1": {"count": 42}}) is False


# --- structure ----------------------------------------------------------------------------------


def test_object_is_and_over_its_keys():
    assert holds({"kws.mode": "full", "0.count": 3}) is True
    assert holds({"kws.mode": "full", "0.count": 4}) is False


def test_list_is_or_over_its_items():
    assert holds([{"kws.mode": "fast"}, {"0.count": 3}]) is True
    assert holds([{"kws.mode": "fast"}, {"0.count": 4}]) is False


def test_or_items_may_be_lists_themselves():
    assert holds([[{"kws.mode": "x"}], [{"kws.mode": "full"}]]) is True


def test_empty_object_holds_and_empty_list_does_not():
    assert holds({}) is True
    assert holds([]) is False


def test_not_key_negates_a_sub_condition():
    assert holds({"not": {"kws.mode": "fast"}}) is True
    assert holds({"not": {"kws.mode": "full"}}) is False
    assert holds({"not": [{"kws.mode": "fast"}, {"kws.mode": "full"}]}) is False


def test_not_key_combines_with_other_keys_by_and():
    assert holds({"0.count": 3, "not": {"kws.flag": False}}) is True
    assert holds({"0.count": 4, "not": {"kws.flag": False}}) is False


def test_scalar_value_means_eq():
    assert holds({"kws.mode": "full"}) is True
    assert holds({"kws.n": 5.0}) is True
    assert holds({"kws.flag": True}) is True
    assert holds({"kws.mode": "fast"}) is False


def test_list_value_means_in():
    assert holds({"kws.mode": ["fast", "full"]}) is True
    assert holds({"kws.mode": ["fast", "slow"]}) is False


def test_several_operators_in_one_object_are_anded():
    assert holds({"kws.n": {"gt": 1, "lt": 10}}) is True
    assert holds({"kws.n": {"gt": 1, "lt": 5}}) is False


def test_missing_path_compares_as_none():
    assert holds({"kws.missing": None}) is True
    assert holds({"kws.missing": {"ne": None}}) is False
    assert holds({"nothing.at.all": {"eq": None}}) is True
    assert holds({"kws.empty": None}) is True


def test_path_through_a_list_maps_over_its_elements():
    assert holds({"0.data.id": {"has": "005"}}) is True
    assert holds({"0.data.id": ["001", "005"]}) is False
    assert holds({"0.data.0.id": "001"}) is True


# --- operators ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"eq": "full"}, True),
        ({"eq": "fast"}, False),
        ({"ne": "fast"}, True),
        ({"ne": "full"}, False),
    ],
)
def test_eq_and_ne_compare_for_equality(value, expected):
    assert holds({"kws.mode": value}) is expected


def test_eq_compares_objects_and_lists_as_json():
    assert holds({"kws.opts": {"eq": {"dry": False, "x": 1}}}) is True
    assert holds({"kws.tags": {"eq": ["a", "b"]}}) is True
    assert holds({"kws.opts": {"eq": {"dry": 0, "x": 1}}}) is False


def test_eq_does_not_confuse_booleans_with_numbers():
    assert holds({"kws.flag": 1}) is False
    assert holds({"kws.flag": {"ne": 1}}) is True


@pytest.mark.parametrize(
    ("op", "operand", "expected"),
    [
        ("gt", 4, True),
        ("gt", 5, False),
        ("ge", 5, True),
        ("ge", 6, False),
        ("lt", 6, True),
        ("lt", 5, False),
        ("le", 5, True),
        ("le", 4.5, False),
    ],
)
def test_ordering_operators_compare_numbers(op, operand, expected):
    assert holds({"kws.n": {op: operand}}) is expected


@pytest.mark.parametrize(
    ("op", "operand", "expected"),
    [("gt", "fast", True), ("lt", "fast", False), ("ge", "full", True), ("le", "a", False)],
)
def test_ordering_operators_compare_strings(op, operand, expected):
    assert holds({"kws.mode": {op: operand}}) is expected


@pytest.mark.parametrize("op", ["gt", "lt", "ge", "le"])
def test_ordering_between_incomparable_types_is_false(op):
    assert holds({"kws.mode": {op: 1}}) is False
    assert holds({"kws.n": {op: "1"}}) is False
    assert holds({"kws.missing": {op: 1}}) is False
    assert holds({"kws.flag": {op: 0}}) is False
    assert holds({"kws.tags": {op: "a"}}) is False


def test_has_checks_list_items_substrings_and_object_keys():
    assert holds({"kws.tags": {"has": "a"}}) is True
    assert holds({"kws.tags": {"has": "z"}}) is False
    assert holds({"kws.name": {"has": "2030"}}) is True
    assert holds({"kws.name": {"has": "2031"}}) is False
    assert holds({"kws.opts": {"has": "dry"}}) is True
    assert holds({"kws.opts": {"has": "wet"}}) is False


def test_has_on_values_that_are_not_containers_is_false():
    assert holds({"kws.n": {"has": 5}}) is False
    assert holds({"kws.missing": {"has": "a"}}) is False
    assert holds({"kws.name": {"has": 1}}) is False


def test_in_checks_the_value_is_in_a_list_string_or_object():
    assert holds({"kws.mode": {"in": ["full", "fast"]}}) is True
    assert holds({"kws.mode": {"in": ["slow"]}}) is False
    assert holds({"kws.mode": {"in": "full-speed"}}) is True
    assert holds({"kws.mode": {"in": {"full": 1}}}) is True
    assert holds({"kws.n": {"in": [5.0]}}) is True
    assert holds({"kws.flag": {"in": [1]}}) is False


def test_match_searches_a_regular_expression_in_a_string():
    assert holds({"kws.name": {"match": r"\d{4}\.csv$"}}) is True
    assert holds({"kws.name": {"match": "^2030"}}) is False
    assert holds({"kws.name": {"match": "port"}}) is True


def test_match_on_a_value_that_is_not_a_string_is_false():
    assert holds({"kws.n": {"match": "5"}}) is False
    assert holds({"kws.missing": {"match": ".*"}}) is False


def test_match_pattern_starting_with_a_bracket_is_backtick_quoted():
    assert holds({"kws.mode": {"match": "`[a-z]+`"}}) is True
    assert holds({"kws.mode": {"match": "`[0-9]+`"}}) is False


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("report%", True),
        ("%.csv", True),
        ("%2030%", True),
        ("report-____.csv", True),
        ("report-___.csv", False),
        ("REPORT%", False),
        ("report", False),
        ("%", True),
        ("%%", True),
        ("r%t%2%v", True),
        ("r%x%v", False),
        ("report-2030.csv", True),
        ("report_2030.csv", True),
        ("report\\_2030.csv", False),
    ],
)
def test_like_is_sql_like_over_the_whole_string(pattern, expected):
    assert holds({"kws.name": {"like": pattern}}) is expected


def test_like_escapes_percent_and_underscore_with_backslash():
    assert holds({"x": {"like": "100\\%"}}, {"x": "100%"}) is True
    assert holds({"x": {"like": "100\\%"}}, {"x": "1000"}) is False
    assert holds({"x": {"like": "a\\_b"}}, {"x": "a_b"}) is True
    assert holds({"x": {"like": "a\\_b"}}, {"x": "axb"}) is False
    assert holds({"x": {"like": "a\\\\b"}}, {"x": "a\\b"}) is True


def test_like_treats_regex_characters_literally_and_spans_newlines():
    assert holds({"x": {"like": "a.*(b)"}}, {"x": "a.*(b)"}) is True
    assert holds({"x": {"like": "a.*(b)"}}, {"x": "aXXb"}) is False
    assert holds({"x": {"like": "a%b"}}, {"x": "a\n\nb"}) is True
    assert holds({"x": {"like": "a_b"}}, {"x": "a\nb"}) is True


def test_like_on_a_value_that_is_not_a_string_is_false():
    assert holds({"kws.n": {"like": "5"}}) is False


def test_like_with_many_wildcards_does_not_backtrack():
    pattern = "%a" * 60 + "%b"
    assert holds({"x": {"like": pattern}}, {"x": "a" * 20_000}) is False


def test_not_operator_negates_an_operator_object_on_the_same_path():
    assert holds({"0.status": {"not": {"eq": "failed"}}}) is True
    assert holds({"0.status": {"not": {"in": ["ok", "failed"]}}}) is False


def test_not_operator_takes_a_scalar_or_a_list_shorthand():
    assert holds({"0.status": {"not": "failed"}}) is True
    assert holds({"0.status": {"not": ["ok"]}}) is False


def test_not_operator_nests():
    assert holds({"0.status": {"not": {"not": "ok"}}}) is True


# --- templates in values ------------------------------------------------------------------------


def test_values_may_be_templates_rendered_against_the_same_data():
    assert holds({"kws.mode": "[kws.allowed.0]"}) is True
    assert holds({"kws.mode": {"in": "[kws.allowed]"}}) is True
    assert holds({"kws.n": {"lt": "[!e:[0.count] * 2]"}}) is True


def test_templates_inside_lists_are_rendered_too():
    assert holds({"kws.mode": ["fast", "[kws.allowed.0]"]}) is True


def test_template_in_a_pattern_is_rendered_then_compiled():
    data = {"x": "abc", "p": "^a.c$", "l": "a%"}
    assert holds({"x": {"match": "[p]", "like": "[l]"}}, data) is True


def test_backtick_quoted_value_is_compared_literally():
    assert holds({"x": "`[y]`"}, {"x": "[y]"}) is True


def test_templates_may_use_now():
    condition = {"t": {"lt": "[!x:now]"}}
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert holds(condition, {"t": "2029-12-31T00:00:00+00:00"}, now=now) is True
    assert holds(condition, {"t": "2030-01-02T00:00:00+00:00"}, now=now) is False


def test_template_with_a_missing_path_fails_at_evaluation_naming_the_field():
    condition = Condition({"1.count": {"gt": "[0.cache.update_threshold]"}})
    with pytest.raises(errors.ValidationError) as info:
        condition.evaluate({"0": {}, "1": {"count": 1}})
    assert info.value.field == "condition.1.count.gt"
    assert "'0' has no key 'cache'" in info.value.message


def test_template_rendering_to_an_unusable_operand_fails_at_evaluation():
    with pytest.raises(errors.ValidationError) as info:
        Condition({"x": {"match": "[p]"}}).evaluate({"x": "a", "p": 5})
    assert info.value.field == "condition.x.match"
    assert "'match' needs a string pattern, got a number" in info.value.message
    with pytest.raises(errors.ValidationError, match="'gt' needs a number or a string"):
        Condition({"x": {"gt": "[p]"}}).evaluate({"x": 1, "p": [1]})
    with pytest.raises(errors.ValidationError, match="invalid regular expression"):
        Condition({"x": {"match": "[p]"}}).evaluate({"x": "a", "p": "("})


# --- validation ---------------------------------------------------------------------------------


def test_unknown_operator_is_a_validation_error_naming_the_field():
    error = invalid({"0.count": {"gte": 1}})
    assert error.field == "condition.0.count.gte"
    assert "unknown operator 'gte'" in error.message
    assert "eq, ne, gt" in error.message


@pytest.mark.parametrize("spec", [5, "x", None, True, "[0.count]"])
def test_condition_must_be_an_object_or_a_list(spec):
    error = invalid(spec)
    assert error.field == "condition"
    assert "must be an object (AND) or a list (OR)" in error.message


def test_or_items_must_be_conditions():
    error = invalid([{"a": 1}, 5])
    assert error.field == "condition.1"
    assert "got a number" in error.message


def test_not_key_needs_a_condition():
    error = invalid({"not": 1})
    assert error.field == "condition.not"
    assert "must be an object (AND) or a list (OR)" in error.message


def test_empty_operator_object_is_a_validation_error():
    error = invalid({"a": {}})
    assert error.field == "condition.a"
    assert "empty operator object" in error.message


@pytest.mark.parametrize("operand", [[1], {"a": 1}, True, None])
def test_ordering_operand_must_be_a_number_or_a_string(operand):
    error = invalid({"a": {"gt": operand}})
    assert error.field == "condition.a.gt"
    assert "'gt' needs a number or a string" in error.message


@pytest.mark.parametrize("operand", [1, True, None])
def test_in_operand_must_be_a_container(operand):
    error = invalid({"a": {"in": operand}})
    assert error.field == "condition.a.in"
    assert "'in' needs a list, a string or an object" in error.message


@pytest.mark.parametrize("op", ["match", "like"])
def test_pattern_operand_must_be_a_string(op):
    error = invalid({"a": {op: 1}})
    assert error.field == f"condition.a.{op}"
    assert f"{op!r} needs a string pattern, got a number" in error.message


def test_bad_regular_expression_is_a_validation_error():
    error = invalid({"a": {"match": "(unclosed"}})
    assert error.field == "condition.a.match"
    assert "invalid regular expression '(unclosed'" in error.message


def test_patterns_use_re2_syntax():
    # RE2 reads "[[a]" as a class of '[' and 'a' (Python's re would warn about a nested set).
    assert holds({"x": {"match": "`[[a]`"}}, {"x": "["}) is True
    # RE2 has no backreferences or lookaround: such patterns are refused, naming the reason.
    error = invalid({"a": {"match": "(a)\\1"}})
    assert "invalid regular expression" in error.message
    assert "invalid escape sequence" in error.message
    assert "invalid regular expression" in invalid({"a": {"match": "a(?=b)"}}).message


def test_too_long_patterns_are_refused():
    long = "a" * (conditions.MAX_PATTERN_LENGTH + 1)
    assert "more than pattern_chars (256)" in invalid({"a": {"match": long}}).message
    assert "more than pattern_chars (256)" in invalid({"a": {"like": long}}).message


def test_like_pattern_ending_with_the_escape_character_is_refused():
    error = invalid({"a": {"like": "abc\\"}})
    assert "ends with the escape character" in error.message


def test_malformed_template_in_a_value_is_a_validation_error_naming_the_field():
    error = invalid({"1.count": {"gt": "[0.cache..update_threshold]"}})
    assert error.field == "condition.1.count.gt"
    assert "has an empty key" in error.message
    error = invalid({"a": ["ok", "[]"]})
    assert error.field == "condition.a.1"


def test_keys_must_be_data_paths():
    error = invalid({"[kws.field]": 1})
    assert error.field == "condition.[kws.field]"
    assert "must be a data path" in error.message
    assert "empty key" in invalid({"a..b": 1}).message
    assert "empty key" in invalid({"": 1}).message


def test_keys_must_be_strings():
    assert "condition keys must be strings" in invalid({1: 1}).message


def test_not_operator_operand_is_validated():
    error = invalid({"a": {"not": {"bogus": 1}}})
    assert error.field == "condition.a.not.bogus"


def test_absurd_nesting_is_refused():
    spec: dict[str, Any] = {"a": 1}
    for _ in range(conditions.MAX_DEPTH + 1):
        spec = {"not": spec}
    assert "nested deeper than" in invalid(spec).message
    value: object = 1
    for _ in range(conditions.MAX_DEPTH + 1):
        value = {"not": value}
    assert "nested deeper than" in invalid({"a": value}).message


def test_validate_function_uses_the_given_field():
    with pytest.raises(errors.ValidationError) as info:
        conditions.validate({"a": {"nope": 1}}, field="commands.1.condition")
    assert info.value.field == "commands.1.condition.a.nope"


def test_evaluate_function_validates_first():
    with pytest.raises(errors.ValidationError, match="unknown operator"):
        conditions.evaluate({"a": {"nope": 1}}, DATA)


# --- the Condition object -----------------------------------------------------------------------


def test_condition_keeps_its_spec_and_returns_it_as_json():
    spec = {"0.count": {"gt": 0}}
    condition = Condition(spec)
    assert condition.spec == spec
    assert condition.to_json() == spec


def test_condition_copies_its_spec():
    spec = {"0.count": {"gt": 0}}
    condition = Condition(spec)
    spec["0.count"]["bogus"] = 1
    assert condition.spec == {"0.count": {"gt": 0}}


def test_conditions_with_equal_specs_are_equal():
    assert Condition({"a": 1}) == Condition({"a": 1})
    assert Condition({"a": 1}) != Condition({"a": True})
    assert Condition({"a": 1}) != {"a": 1}


def test_condition_repr_shows_the_spec():
    assert repr(Condition({"a": 1})) == "Condition({'a': 1})"


def test_condition_accepts_another_condition():
    assert Condition(Condition({"a": 1})) == Condition({"a": 1})


def test_evaluate_function_accepts_a_condition():
    assert conditions.evaluate(Condition({"kws.mode": "full"}), DATA) is True


def test_condition_uses_the_field_name_given():
    with pytest.raises(errors.ValidationError) as info:
        Condition({"a": {"nope": 1}}, field="commands.0.condition")
    assert info.value.field == "commands.0.condition.a.nope"


# --- properties ---------------------------------------------------------------------------------

KEYS = ["0", "1", "a", "b", "x", "0.count", "a.b", "not", "kws.mode"]
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([*KEYS, *conditions.OPERATORS]), inner, max_size=3)
    ),
    max_leaves=10,
)
operand = (
    json_scalars
    | st.sampled_from(
        ["[a]", "[0.count:1]", "[!e:1 + 1]", "`[x]`", "%a_", "^a", "(", "[", "a\\", "`[[a]`"]
    )
    | st.lists(json_scalars, max_size=3)
)
operator_object = st.dictionaries(
    st.sampled_from(conditions.OPERATORS), operand, min_size=1, max_size=3
)
valid_looking = st.recursive(
    st.dictionaries(st.sampled_from(KEYS), operand | operator_object, max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.builds(lambda c: {"not": c}, inner),
    max_leaves=8,
)
data_values = st.dictionaries(
    st.sampled_from(["0", "1", "a", "b", "x", "kws"]), json_values, max_size=5
)


def outcome(function, *args):
    try:
        return function(*args)
    except errors.ValidationError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(json_values | valid_looking)
def test_building_a_condition_from_any_json_returns_or_raises_validation_error(spec):
    result = outcome(Condition, spec)
    assert isinstance(result, Condition | errors.ValidationError)


@settings(max_examples=300, deadline=None)
@given(json_values | valid_looking, data_values)
def test_evaluating_any_json_returns_a_bool_or_raises_validation_error(spec, data):
    result = outcome(conditions.evaluate, spec, data)
    assert isinstance(result, bool | errors.ValidationError)


@settings(max_examples=200, deadline=None)
@given(valid_looking, data_values)
def test_not_key_is_the_negation_of_its_condition(spec, data):
    result = outcome(conditions.evaluate, spec, data)
    if isinstance(result, bool):
        assert conditions.evaluate({"not": spec}, data) is (not result)


def like_reference(pattern: str, text: str) -> bool:
    """A plain recursive SQL LIKE, to check the chunked implementation against."""
    if not pattern:
        return not text
    head = pattern[0]
    if head == "%":
        return any(like_reference(pattern[1:], text[i:]) for i in range(len(text) + 1))
    if head == "\\":
        return bool(text) and text[0] == pattern[1] and like_reference(pattern[2:], text[1:])
    if not text:
        return False
    return (head == "_" or head == text[0]) and like_reference(pattern[1:], text[1:])


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab%_\\", max_size=8).filter(lambda p: not re.search(r"(?<!\\)(\\\\)*\\$", p)),
    st.text(alphabet="ab%_\\", max_size=8),
)
def test_like_agrees_with_a_reference_implementation(pattern, text):
    result = outcome(conditions.evaluate, {"x": {"like": pattern}}, {"x": text})
    if isinstance(result, errors.ValidationError):
        # only patterns that are themselves templates ("[...]") or end in an escape are refused
        pytest.fail(f"unexpected error for {pattern!r}: {result}")
    assert result is like_reference(pattern, text)
