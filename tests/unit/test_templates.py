from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kaiju_tasks import errors, templates

NOW = datetime(2030, 1, 1, tzinfo=UTC)

# The template data of the user guide's "Sharing data between stages".
GUIDE_DATA: dict[str, Any] = {
    "id": "my_task",
    "kws": {"command_name": "items.delete"},
    "executor": {"some_value_from_executor_config": True},
    "0": {"data": [{"id": "001"}, {"id": "005"}, {"id": "101"}]},
}

DATA: dict[str, Any] = {
    "id": "my_task",
    "kws": {
        "command_name": "items.m_delete",
        "key_name": "kws.command_name",
        "field": "name",
        "name": "Ann",
        "mode": "fast",
        "empty": None,
        "flag": False,
        "n": 3,
        "price": 2.5,
        "text": "a,b,c",
        "when": "2030-01-02T00:00:00+00:00",
        "nested": {"a": 1, "b": [1, 2]},
        "huge": [1e308, 1e308],
    },
    "executor": {"name": "ex-1"},
    "0": {"data": [{"id": "001", "n": 1}, {"id": "005", "n": 2}], "count": 2, "items": []},
    "1": {"count": 1000},
}


def render(value, data=DATA, **kwargs):
    return templates.render(value, data, **kwargs)


def render_error(value, data=DATA, **kwargs) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        templates.render(value, data, **kwargs)
    return info.value


def parse_error(template: str) -> errors.ValidationError:
    with pytest.raises(errors.ValidationError) as info:
        templates.parse(template)
    return info.value


# --- the user guide -----------------------------------------------------------------------------


def test_guide_method_template_renders_the_command_name_from_kws():
    assert templates.render("[kws.command_name]", GUIDE_DATA) == "items.delete"


def test_guide_path_through_list_maps_rest_of_path_over_elements():
    assert templates.render("[0.data.id]", GUIDE_DATA) == ["001", "005", "101"]


def test_guide_command_renders_method_and_params_together():
    command = {"method": "[kws.command_name]", "params": {"id": "[0.data.id]"}}
    assert templates.render(command, GUIDE_DATA) == {
        "method": "items.delete",
        "params": {"id": ["001", "005", "101"]},
    }


def test_guide_executor_data_and_task_id_are_reachable():
    assert templates.render("[executor.some_value_from_executor_config]", GUIDE_DATA) is True
    assert templates.render("[id]", GUIDE_DATA) == "my_task"


# --- what is a template -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[x]", True),
        ("[]", True),
        ("[a]-[b]", True),
        ("x", False),
        ("[x", False),
        ("x]", False),
        ("[", False),
        ("", False),
        ("prefix-[id]", False),
        ("`[x]`", False),
        (1, False),
        (None, False),
    ],
)
def test_is_template_means_starts_with_open_and_ends_with_close_bracket(value, expected):
    assert templates.is_template(value) is expected


@pytest.mark.parametrize("value", ["plain", "prefix-[id]", "[id", "", 1, 1.5, True, None])
def test_non_template_values_pass_through_unchanged(value):
    assert render(value) == value


def test_substitution_inside_longer_text_is_not_done():
    assert render("id is [id]") == "id is [id]"


def test_dicts_and_lists_are_rendered_recursively_and_keys_are_not_templated():
    value = {"[id]": ["[kws.n]", {"deep": "[kws.mode]"}, 7], "plain": "x"}
    assert render(value) == {"[id]": [3, {"deep": "fast"}, 7], "plain": "x"}


def test_tuples_are_rendered_as_lists():
    assert render(("[kws.n]", 1)) == [3, 1]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("[kws.nested]", {"a": 1, "b": [1, 2]}),
        ("[kws.nested.b]", [1, 2]),
        ("[kws.n]", 3),
        ("[kws.price]", 2.5),
        ("[kws.flag]", False),
        ("[kws.empty]", None),
    ],
)
def test_whole_string_template_keeps_the_type_of_the_value(template, expected):
    assert render(template) == expected
    assert type(render(template)) is type(expected)


def test_backtick_quoted_string_is_a_literal_without_its_backticks():
    assert render("`[not a template]`") == "[not a template]"
    assert render("`plain`") == "plain"
    assert render("`[a]-[b`") == "[a]-[b"


def test_a_single_backtick_is_not_a_literal():
    assert render("`") == "`"


# --- paths --------------------------------------------------------------------------------------


def test_integer_path_part_indexes_into_a_list():
    assert render("[0.data.1.id]") == "005"


def test_negative_index_counts_from_the_end_of_a_list():
    assert render("[0.data.-1.id]") == "005"


def test_path_ending_on_a_list_returns_the_list():
    assert render("[0.data]") == DATA["0"]["data"]


def test_mapping_over_an_empty_list_gives_an_empty_list():
    assert render("[0.items.id]") == []


def test_mapping_nests_when_a_list_holds_lists():
    data = {"a": [{"b": [{"c": 1}, {"c": 2}]}, {"b": [{"c": 3}]}]}
    assert render("[a.b.c]", data) == [[1, 2], [3]]


def test_integer_like_part_also_finds_an_integer_key():
    assert render("[0.x]", {0: {"x": "int key"}}) == "int key"


def test_string_key_wins_over_integer_key():
    assert render("[0]", {"0": "str", 0: "int"}) == "str"


def test_missing_key_raises_naming_the_template_and_the_key():
    error = render_error({"method": "[kws.missing]"})
    assert error.field == "params.method"
    assert "'[kws.missing]'" in error.message
    assert "'kws' has no key 'missing'" in error.message


def test_missing_top_level_key_names_the_data():
    error = render_error("[nope]")
    assert "the data has no key 'nope'" in error.message


def test_missing_key_in_one_list_element_names_that_element():
    data = {"a": [{"id": 1}, {"x": 2}]}
    error = render_error("[a.id]", data)
    assert "'a.1' has no key 'id'" in error.message


def test_index_out_of_range_is_reported():
    error = render_error("[0.data.5.id]")
    assert "index 5 is out of range for '0.data' (length 2)" in error.message


def test_path_into_a_scalar_is_reported():
    error = render_error("[kws.n.x]")
    assert "'kws.n' is a number, it has no key 'x'" in error.message


def test_null_value_without_default_renders_as_none():
    assert render("[kws.empty]") is None


def test_paths_are_taken_verbatim_without_trimming():
    assert render("[ key ]", {" key ": 1}) == 1
    assert render("[kws.with space]", {"kws": {"with space": 2}}) == 2


# --- defaults -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("[x:1]", 1),
        ("[x:-7]", -7),
        ("[x:1.5]", 1.5),
        ("[x:1e3]", 1000.0),
        ("[x:true]", True),
        ("[x:false]", False),
        ("[x:null]", None),
        ("[x:abc]", "abc"),
        ("[x:]", ""),
        ("[x: 1]", " 1"),
        ("[x:01]", "01"),
        ("[x:a:b]", "a:b"),
        ("[x:`a:b`]", "a:b"),
        ("[x:`[not a template]`]", "[not a template]"),
        ("[x:`1`]", "1"),
    ],
)
def test_default_literal_is_read_as_a_json_scalar_or_raw_string(template, expected):
    result = render(template)
    assert result == expected
    assert type(result) is type(expected)


def test_default_is_used_when_the_value_is_null():
    assert render("[kws.empty:5]") == 5


def test_default_is_ignored_when_the_value_is_present():
    assert render("[kws.n:5]") == 3
    assert render("[kws.flag:true]") is False


def test_default_applies_per_element_when_mapping_over_a_list():
    data = {"a": [{"id": 1}, {}, {"id": None}]}
    assert render("[a.id:0]", data) == [1, 0, 0]


def test_default_may_be_a_template_rendered_only_when_needed():
    assert render("[x:[kws.n]]") == 3
    assert render("[kws.mode:[does.not.exist]]") == "fast"


def test_default_template_that_is_missing_too_raises():
    error = render_error("[x:[y]]")
    assert "the data has no key 'y'" in error.message


def test_huge_number_default_stays_a_string():
    digits = "9" * 500
    assert render(f"[x:{digits}]") == digits


# --- nesting ------------------------------------------------------------------------------------


def test_nested_template_result_is_used_as_the_path():
    assert render("[[kws.key_name]]") == "items.m_delete"


def test_nested_template_can_be_part_of_a_path():
    assert render("[kws.[kws.field]]") == "Ann"


def test_nested_template_with_an_integer_result_indexes():
    data = {"0": {"count": 1, "data": [{"id": "a"}, {"id": "b"}]}}
    assert render("[0.data.[0.count].id]", data) == "b"


def test_nested_template_must_render_to_a_string():
    error = render_error("[[kws.nested]]")
    assert "nested template '[kws.nested]' must render to a string, got an object" in error.message


def test_nested_template_rendering_an_empty_segment_is_reported():
    error = render_error("[[kws.x:a..b]]")
    assert "path 'a..b' has an empty key" in error.message


def test_template_with_a_default_nested_in_a_default_chain():
    assert render("[x:[y:[kws.mode]]]") == "fast"


# --- !x functions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("[!x:len:0.data]", 2),
        ("[!x:len:kws.name]", 3),
        ("[!x:len:kws.nested]", 2),
        ("[!x:int:kws.price]", 2),
        ("[!x:int:`42`]", 42),
        ("[!x:float:kws.n]", 3.0),
        ("[!x:float:`1.25`]", 1.25),
        ("[!x:str:kws.n]", "3"),
        ("[!x:str:kws.nested]", '{"a": 1, "b": [1, 2]}'),
        ("[!x:str:kws.name]", "Ann"),
        ("[!x:bool:kws.n]", True),
        ("[!x:bool:kws.flag]", False),
        ("[!x:not:kws.flag]", True),
        ("[!x:sum:0.data.n]", 3),
        ("[!x:min:0.data.n]", 1),
        ("[!x:max:0.data.n]", 2),
        ("[!x:min:3:1:2]", 1),
        ("[!x:max:`a`:`c`:`b`]", "c"),
        ("[!x:first:0.data.id]", "001"),
        ("[!x:last:0.data.id]", "005"),
        ("[!x:first:0.items]", None),
        ("[!x:last:0.items]", None),
        ("[!x:upper:kws.name]", "ANN"),
        ("[!x:lower:kws.name]", "ann"),
        ("[!x:join:`, `:0.data.id]", "001, 005"),
        ("[!x:join:`-`:kws.nested.b]", "1-2"),
        ("[!x:split:`,`:kws.text]", ["a", "b", "c"]),
        ("[!x:abs:-4]", 4),
        ("[!x:round:kws.price]", 2),
        ("[!x:round:2.567:1]", 2.6),
        ("[!x:keys:kws.nested]", ["a", "b"]),
        ("[!x:values:kws.nested]", [1, [1, 2]]),
        ("[!x:default:kws.missing:`none`]", "none"),
        ("[!x:default:kws.empty:0]", 0),
        ("[!x:default:kws.n:0]", 3),
        ("[!x:len:[0.data]]", 2),
        ("[!x:len:[0]]", 3),
        ("[!x:str:0]", "0"),
        ("[!x:str:null]", "null"),
        ("[!x:str:true]", "true"),
        ("[!x:timestamp:kws.when]", int(datetime(2030, 1, 2, tzinfo=UTC).timestamp())),
    ],
)
def test_x_helper_calls_a_whitelisted_function(template, expected):
    result = render(template)
    assert result == expected
    assert type(result) is type(expected)


def test_x_now_uses_the_injected_time_as_iso_utc():
    assert render("[!x:now]", now=NOW) == "2030-01-01T00:00:00+00:00"


def test_x_now_converts_an_aware_time_to_utc():
    local = datetime(2030, 1, 1, 3, tzinfo=timezone(timedelta(hours=3)))
    assert render("[!x:now]", now=local) == "2030-01-01T00:00:00+00:00"


def test_x_now_treats_a_naive_time_as_utc():
    assert render("[!x:now]", now=datetime(2030, 1, 1)) == "2030-01-01T00:00:00+00:00"  # noqa: DTZ001


def test_x_now_falls_back_to_now_in_the_data():
    assert render("[!x:now]", {"now": NOW}) == "2030-01-01T00:00:00+00:00"
    assert render("[!x:now]", {"now": "2030-01-01T00:00:00Z"}) == "2030-01-01T00:00:00+00:00"


def test_x_now_without_a_time_is_a_clear_error():
    error = render_error("[!x:now]")
    assert "the current time is unknown" in error.message


def test_x_now_with_a_bad_time_in_the_data_is_an_error():
    error = render_error("[!x:now]", {"now": "yesterday"})
    assert "'yesterday' is not an ISO-8601 date and time" in error.message


def test_x_timestamp_without_arguments_is_now_in_unix_seconds():
    assert render("[!x:timestamp]", now=NOW) == int(NOW.timestamp())


def test_x_uuid4_returns_a_fresh_uuid_string():
    first, second = render(["[!x:uuid4]", "[!x:uuid4]"])
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", first
    )
    assert first != second


def test_x_unknown_function_is_a_validation_error_naming_it():
    error = parse_error("[!x:eval:`1`]")
    assert "unknown function 'eval'" in error.message


def test_x_wrong_number_of_arguments_is_a_validation_error():
    assert "function 'len' takes 1 argument(s), got 0" in parse_error("[!x:len]").message
    assert "'round' takes 1 to 2 argument(s), got 3" in parse_error("[!x:round:1:2:3]").message
    assert "'max' takes at least 1 argument(s), got 0" in parse_error("[!x:max]").message


def test_x_empty_argument_is_a_validation_error():
    assert "empty argument" in parse_error("[!x:join::kws.text]").message


def test_x_function_name_must_be_plain_text():
    assert "needs a function name" in parse_error("[!x:`len`:kws.text]").message


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("[!x:len:kws.n]", "len() needs a string, list or object, got a number"),
        ("[!x:int:`abc`]", "!x:int failed"),
        ("[!x:sum:kws.text]", "sum() needs a list"),
        ("[!x:min:0.items]", "min() of an empty list"),
        ("[!x:max:1:`a`]", "max() needs all numbers or all strings"),
        ("[!x:split:``:kws.text]", "split() needs a non-empty separator"),
        ("[!x:upper:kws.n]", "upper() needs a string"),
        ("[!x:keys:kws.n]", "keys() needs an object"),
        ("[!x:float:`inf`]", "float() result is not a finite number"),
        ("[!x:sum:kws.huge]", "!x:sum result is not a finite number"),
        ("[!x:len:kws.missing]", "'kws' has no key 'missing'"),
    ],
)
def test_x_function_given_unusable_values_raises_a_validation_error(template, fragment):
    error = render_error(template)
    assert fragment in error.message
    assert error.field == "params"


# --- !e expressions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("[!e:1 + 2 * 3]", 7),
        ("[!e:(1 + 2) * 3]", 9),
        ("[!e:7 - 2 - 1]", 4),
        ("[!e:7 / 2]", 3.5),
        ("[!e:7 % 4]", 3),
        ("[!e:-kws.n + 1]", -2),
        ("[!e:+kws.n]", 3),
        ("[!e:kws.price * 2]", 5.0),
        ("[!e:[0.count] * 2 > 3]", True),
        ("[!e:0.count == 2]", True),
        ("[!e:kws.mode != `slow`]", True),
        ("[!e:kws.n < 3]", False),
        ("[!e:kws.n <= 3]", True),
        ("[!e:kws.n >= 4]", False),
        ("[!e:`a` < `b`]", True),
        ("[!e:kws.name + `!`]", "Ann!"),
        ("[!e:kws.nested.b + kws.nested.b]", [1, 2, 1, 2]),
        ("[!e:true and false]", False),
        ("[!e:false or 1 == 1]", True),
        ("[!e:not kws.flag]", True),
        ("[!e:not 1 == 2 and 2 == 2]", True),
        ("[!e:null == kws.empty]", True),
        ("[!e:true == 1]", False),
        ("[!e:1 == 1.0]", True),
        ("[!e:[kws.missing:10] - 1]", 9),
        ("[!e:[!x:len:0.data] + 1]", 3),
        ("[!e:1.5]", 1.5),
    ],
)
def test_e_helper_evaluates_a_safe_expression(template, expected):
    result = render(template)
    assert result == expected
    assert type(result) is type(expected)


def test_e_and_or_short_circuit_past_failing_operands():
    assert render("[!e:false and kws.missing]") is False
    assert render("[!e:true or kws.missing]") is True


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("[!e:]", "empty expression"),
        ("[!e:1 +]", "unexpected the end of the expression"),
        ("[!e:(1 + 2]", "expected ')' but found the end of the expression"),
        ("[!e:1 2]", "unexpected 2 in expression"),
        ("[!e:1 < 2 < 3]", "comparisons cannot be chained"),
        ("[!e:'a' == 1]", 'unexpected character "\'"'),
        ("[!e:kws..n]", "path 'kws..n' has an empty key"),
        ("[!e:`abc]", "unterminated backtick string"),
        ("[!e:)]", "unexpected ')'"),
        ("[!e:__import__(`os`)]", "unexpected '('"),
    ],
)
def test_e_malformed_expression_is_a_validation_error(template, fragment):
    assert fragment in parse_error(template).message


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("[!e:1 / 0]", "division by zero"),
        ("[!e:1 % 0]", "division by zero"),
        ("[!e:kws.name - 1]", "'-' needs numbers, got a string and a number"),
        ("[!e:kws.name < 1]", "cannot compare a string and a number with '<'"),
        ("[!e:-kws.name]", "unary '-' needs a number, got a string"),
        ("[!e:true + 1]", "'+' needs numbers, got a boolean and a number"),
        ("[!e:kws.missing + 1]", "'kws' has no key 'missing'"),
    ],
)
def test_e_expression_over_unusable_values_is_a_validation_error(template, fragment):
    assert fragment in render_error(template).message


def test_e_huge_integer_results_are_refused():
    expression = " * ".join(["99999999999999999999"] * 60)
    assert "is too large" in render_error(f"[!e:{expression}]").message


def test_e_huge_number_literal_is_refused():
    assert "is too long" in parse_error(f"[!e:{'9' * 500}]").message


def test_e_non_finite_float_results_are_refused():
    expression = " * ".join(["1" + "0" * 300 + ".0"] * 2)
    assert "not a finite number" in render_error(f"[!e:{expression}]").message


# --- !f format ----------------------------------------------------------------------------------


def test_f_helper_substitutes_placeholders_in_text():
    template = "[!f:Hello {kws.name}, you have {0.count} items]"
    assert render(template) == "Hello Ann, you have 2 items"


def test_f_placeholders_format_non_strings_as_json():
    assert render("[!f:{kws.nested} {kws.flag} {kws.empty} {0.data.id}]") == (
        '{"a": 1, "b": [1, 2]} false null ["001", "005"]'
    )


def test_f_doubled_braces_are_literal_braces():
    assert render("[!f:{{literal}} {kws.n}]") == "{literal} 3"


def test_f_placeholder_takes_a_default_and_helpers():
    assert render("[!f:{kws.missing:anon}/{!x:len:0.data}/{[kws.key_name]}]") == (
        "anon/2/items.m_delete"
    )


def test_f_brackets_in_the_text_are_ordinary_characters():
    assert render("[!f:[{kws.n}] and [x]]") == "[3] and [x]"


def test_f_backtick_quoted_text_is_copied_without_backticks():
    assert render("[!f:`{not a placeholder} ]` {kws.n}]") == "{not a placeholder} ] 3"


def test_f_empty_text_renders_an_empty_string():
    assert render("[!f:]") == ""


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("[!f:{kws.n]", "unclosed '{'"),
        ("[!f:a } b]", "single '}'"),
        ("[!f:{}]", "empty path"),
        ("[!f:{a{b}}]", "'{' inside a !f placeholder"),
        ("[!f:{!x:nope}]", "unknown function 'nope'"),
    ],
)
def test_f_malformed_format_is_a_validation_error(template, fragment):
    assert fragment in parse_error(template).message


# --- parse and validate -------------------------------------------------------------------------


def test_parse_returns_a_node_that_renders_against_data():
    node = templates.parse("[kws.mode]")
    assert isinstance(node, templates.Node)
    assert node.render(DATA) == "fast"


def test_parse_is_cached():
    assert templates.parse("[kws.mode:x]") is templates.parse("[kws.mode:x]")


def test_parse_refuses_a_string_that_is_not_a_template():
    assert "not a template" in parse_error("kws.mode").message


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("[]", "empty path"),
        ("[:default]", "empty path"),
        ("[a]-[b]", "unexpected ']'"),
        ("[[a]", "missing ']'"),
        ("[a]]", "unexpected ']'"),
        ("[`a]", "unterminated backtick string"),
        ("[a..b]", "path 'a..b' has an empty key"),
        ("[.a]", "has an empty key"),
        ("[a.]", "has an empty key"),
        ("[a.`b`]", "backtick-quoted text is not allowed in a path"),
        ("[[]]", "empty path"),
        ("[a:x[b]]", "invalid default"),
        ("[a:`x`y]", "invalid default"),
        ("[!]", "unknown helper '!'"),
        ("[!q:x]", "unknown helper '!q'"),
        ("[!x]", "unknown helper '!x'"),
    ],
)
def test_parse_malformed_template_is_a_validation_error(template, fragment):
    error = parse_error(template)
    assert error.message.startswith(f"invalid template {template!r}: ")
    assert fragment in error.message


def test_parse_deeply_nested_template_is_refused():
    template = "[" * 40 + "x" + "]" * 40
    assert "nested too deeply" in parse_error(template).message


def test_parse_deeply_nested_parentheses_are_refused():
    template = "[!e:" + "(" * 40 + "1" + ")" * 40 + "]"
    assert "nested too deeply" in parse_error(template).message


def test_parse_long_unary_chains_are_refused():
    assert "nested too deeply" in parse_error("[!e:" + "- " * 40 + "1]").message
    assert "nested too deeply" in parse_error("[!e:" + "not " * 40 + "true]").message


def test_validate_accepts_valid_templates_and_plain_values():
    templates.validate({"a": ["[x]", "[!e:1 + 1]", "plain", 1, None, "`[x`"]})


def test_validate_names_the_dotted_path_to_the_bad_template():
    with pytest.raises(errors.ValidationError) as info:
        templates.validate({"conditions": {"id": "[]"}})
    assert info.value.field == "params.conditions.id"
    assert "empty path" in info.value.message


def test_validate_names_list_indexes_in_the_path():
    with pytest.raises(errors.ValidationError) as info:
        templates.validate(["ok", {"x": "[!x:nope]"}], field="method")
    assert info.value.field == "method.1.x"
    assert "unknown function 'nope'" in info.value.message


def test_validate_refuses_absurdly_deep_values():
    value: list[Any] = []
    for _ in range(templates.MAX_VALUE_DEPTH + 5):
        value = [value]
    with pytest.raises(errors.ValidationError, match="nested deeper"):
        templates.validate(value)
    with pytest.raises(errors.ValidationError, match="nested deeper"):
        templates.render(value, {})


def test_render_reports_parse_errors_with_the_field():
    error = render_error({"a": ["[x", "[]"]})
    assert error.field == "params.a.1"
    assert "invalid template '[]'" in error.message


def test_render_uses_the_given_field_name():
    error = render_error("[nope]", field="method")
    assert error.field == "method"


def test_condition_is_importable_from_templates():
    from kaiju_tasks import conditions
    from kaiju_tasks.templates import Condition

    assert Condition is conditions.Condition
    with pytest.raises(AttributeError):
        _ = templates.NoSuchName


# --- helpers ------------------------------------------------------------------------------------


def test_get_path_follows_the_template_path_rules():
    assert templates.get_path(DATA, "0.data.id") == ["001", "005"]
    assert templates.get_path(DATA, "0.data.0.id") == "001"
    assert templates.get_path(DATA, "kws.missing", default=None) is None
    assert templates.get_path(DATA, "kws.empty", default=1) == 1


def test_get_path_without_default_raises_on_missing_path():
    with pytest.raises(errors.ValidationError, match="'kws' has no key 'missing'"):
        templates.get_path(DATA, "kws.missing")


def test_get_path_refuses_empty_keys():
    with pytest.raises(errors.ValidationError, match="empty key"):
        templates.get_path(DATA, "")


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (1, 1.0, True),
        (True, 1, False),
        (True, True, True),
        (None, None, True),
        (None, 0, False),
        ("1", 1, False),
        ([1, {"a": True}], [1, {"a": True}], True),
        ([1], [True], False),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ([1], {"a": 1}, False),
    ],
)
def test_json_equal_compares_like_json(left, right, expected):
    assert templates.json_equal(left, right) is expected


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [(1, 2, -1), (2.5, 2, 1), ("b", "a", 1), ("a", "a", 0), ("a", 1, None), (True, 1, None)],
)
def test_compare_orders_numbers_and_strings_only(left, right, expected):
    assert templates.compare(left, right) == expected


# --- properties ---------------------------------------------------------------------------------

TEMPLATE_ALPHABET = "[]`:!.{}xef012-+*/%()<>= a_btn"
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
template_like = st.builds(
    lambda body: f"[{body}]", st.text(alphabet=TEMPLATE_ALPHABET, max_size=30)
) | st.sampled_from(["[!x:", "[!e:", "[!f:", "[0.", "[x:", "`"]).flatmap(
    lambda head: st.text(alphabet=TEMPLATE_ALPHABET, max_size=25).map(lambda t: f"{head}{t}]")
)
data_values = st.dictionaries(
    st.sampled_from(["0", "1", "x", "a", "b", "kws", "now", "e", "f"]), json_values, max_size=5
)


@settings(max_examples=300, deadline=None)
@given(st.text() | template_like)
def test_parse_of_any_string_returns_a_node_or_raises_validation_error(text):
    try:
        node = templates.parse(text)
    except errors.ValidationError:
        return
    assert isinstance(node, templates.Node)


@settings(max_examples=300, deadline=None)
@given(
    value=st.recursive(
        template_like | json_scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    data=data_values,
)
def test_render_of_any_json_returns_json_or_raises_validation_error(value, data):
    failure = None
    try:
        templates.render(value, data, now=NOW)
    except errors.ValidationError as exc:
        failure = exc
    assert failure is None or str(failure.field).startswith("params")


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_validate_of_any_json_returns_or_raises_validation_error(value):
    failure = None
    try:
        templates.validate(value)
    except errors.ValidationError as exc:
        failure = exc
    assert failure is None or str(failure.field).startswith("params")


@settings(max_examples=200, deadline=None)
@given(st.text().filter(lambda s: not templates.is_template(s) and not templates.is_literal(s)))
def test_render_leaves_strings_that_are_not_templates_alone(text):
    assert templates.render(text, {}) == text


@settings(max_examples=200, deadline=None)
@given(
    data=data_values,
    path=st.lists(st.sampled_from(["0", "1", "x", "a", "-1"]), min_size=1, max_size=4),
)
def test_template_path_agrees_with_get_path(data, path):
    dotted = ".".join(path)
    expected = templates.get_path(data, dotted, default="<missing>")
    assert templates.render(f"[{dotted}:`<missing>`]", data) == expected
