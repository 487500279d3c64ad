"""The JSON value rules templates and conditions share (kaiju_tasks.values)."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest

from kaiju_tasks import conditions, errors, limits, templates, values

# --- sharing ------------------------------------------------------------------------------------


def test_templates_reexport_the_shared_helpers_themselves():
    # One implementation: a Budget made through either name is the same class, so a condition
    # and the templates of its operands draw from one allowance.
    assert templates.Budget is values.Budget
    assert templates.json_equal is values.json_equal
    assert templates.compare is values.compare
    assert templates.json_size is values.json_size
    assert templates.shown is values.shown
    assert templates.field_name is values.field_name


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_values_imports_neither_templates_nor_conditions():
    imported = _imported_modules(Path(values.__file__))
    assert not {m for m in imported if m.startswith(("kaiju_tasks.templates", "kaiju_tasks.cond"))}


def test_template_modules_do_not_import_conditions():
    package = Path(templates.__file__).parent
    for path in package.glob("*.py"):
        if path.name == "__init__.py":
            continue  # resolves the documented alias templates.Condition lazily, on access
        assert "kaiju_tasks.conditions" not in _imported_modules(path), path.name


def test_a_condition_and_its_operand_templates_draw_from_one_budget():
    budget = values.Budget(1_000)
    assert conditions.evaluate({"kws.a": {"eq": "[kws.a]"}}, {"kws": {"a": 1}}, budget=budget)
    assert 0 < budget.left < 1_000


# --- json_equal ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (1, 1.0, True),
        (0, -0.0, True),
        (False, 0, False),
        (0, False, False),
        (False, False, True),
        (None, None, True),
        (None, False, False),
        ("a", "a", True),
        ("1", 1, False),
        ([1, 2], (1, 2), True),  # a tuple is a JSON array too
        ([1, 2], [2, 1], False),
        ([1], [1, 1], False),
        ({"a": [1, {"b": None}]}, {"a": [1.0, {"b": None}]}, True),
        ({"a": 1}, {"b": 1}, False),
        ({"a": 1}, [1], False),
        ("[]", [], False),
    ],
)
def test_json_equal_follows_json_rules(left, right, expected):
    assert values.json_equal(left, right) is expected
    assert values.json_equal(right, left) is expected


def test_nan_is_not_equal_even_to_itself():
    nan = math.nan
    assert values.json_equal(nan, nan) is False
    assert values.json_equal([nan], [nan]) is False


def test_json_equal_charges_what_it_compares():
    budget = values.Budget(100)
    assert values.json_equal({"a": [1, 2, 3]}, {"a": [1, 2, 3]}, budget)
    spent = 100 - budget.left
    assert spent > 0
    cheap = values.Budget(100)
    assert values.json_equal(1, 1, cheap)
    assert 100 - cheap.left < spent


def test_json_equal_stops_once_the_budget_is_spent():
    left = [[i] for i in range(1_000)]
    right = [[i] for i in range(1_000)]  # equal, but not the same objects: each is compared
    assert values.json_equal(left, right, values.Budget(10_000))
    with pytest.raises(errors.ValidationError, match="eval_steps"):
        values.json_equal(left, right, values.Budget(50))


# --- compare ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (1, 2, -1),
        (2, 1.5, 1),
        (3, 3.0, 0),
        ("a", "b", -1),
        ("b", "a", 1),
        ("", "", 0),
        ("1", 1, None),
        (True, False, None),
        (None, None, None),
        ([1], [2], None),
    ],
)
def test_compare_orders_only_two_numbers_or_two_strings(left, right, expected):
    assert values.compare(left, right) == expected


# --- json_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "",
        None,
        True,
        0,
        12345678,
        1.5,
        [],
        {},
        [1, "two", None, False],
        {"key": {"nested": ["a", "b"]}, "n": 1},
    ],
)
def test_json_size_is_at_least_the_encoded_size_less_punctuation(value: Any):
    size = values.json_size(value, 10**9)
    encoded = len(json.dumps(value, separators=(",", ":")))
    # Counts characters (a lower bound of UTF-8 bytes) and generous punctuation: never far off.
    assert size >= encoded - 2
    assert size <= 8 * encoded + 8


def test_json_size_stops_once_past_the_bound():
    value = ["x" * 1_000] * 3
    size = values.json_size(value, 500)
    assert 500 < size < values.json_size(value, 10**9)  # stopped at the first string
    assert size == 1_007  # the list (2 + 3) and one string (1,000 + 2)


def test_json_size_charges_the_budget_for_what_it_visited():
    budget = values.Budget(10**6)
    values.json_size(["a"] * 100, 10**9, budget)
    assert 10**6 - budget.left >= 101  # the list and each item


# --- Budget -------------------------------------------------------------------------------------


def test_budget_defaults_to_the_eval_steps_limit():
    budget = values.Budget()
    assert budget.limit == budget.left == limits.active().eval_steps


def test_budget_refuses_work_past_its_limit_and_names_it():
    budget = values.Budget(10)
    budget.charge(10)
    assert budget.left == 0
    with pytest.raises(errors.ValidationError, match=r"more than eval_steps \(10 steps\)"):
        budget.charge(1)


def test_budget_charges_one_step_per_started_kilobyte_of_characters():
    budget = values.Budget(100)
    budget.chars(0)
    assert budget.left == 99
    budget.chars(values.CHARS_PER_STEP - 1)
    assert budget.left == 98
    budget.chars(values.CHARS_PER_STEP * 3)
    assert budget.left == 94


# --- messages -----------------------------------------------------------------------------------


def test_shown_quotes_short_text_whole():
    assert values.shown("abc") == "'abc'"
    assert values.shown("it's") == '"it\'s"'


def test_shown_cuts_long_text_to_the_width():
    quoted = values.shown("x" * 500, width=20)
    assert quoted == repr("x" * 17) + "..."
    assert len(values.shown("y" * 500)) < 100


def test_shown_masks_the_password_of_a_url():
    quoted = values.shown("postgresql://user:s3cret@db:5432/app")
    assert "s3cret" not in quoted
    assert "user" in quoted
    assert "db:5432" in quoted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "null"),
        (True, "a boolean"),
        (0, "a number"),
        (1.5, "a number"),
        ("", "a string"),
        ([], "a list"),
        ((1,), "a list"),
        ({}, "an object"),
        (b"x", "a bytes"),
    ],
)
def test_type_name_names_json_types(value, expected):
    assert values.type_name(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, True), (1.5, True), (-0.0, True), (True, False), ("1", False), (None, False)],
)
def test_is_number_excludes_booleans(value, expected):
    assert values.is_number(value) is expected


def test_field_name_spells_out_nested_positions():
    assert values.field_name("params") == "params"
    assert values.field_name((("params", "items"), 3)) == "params.items.3"
    assert values.field_name(((("condition", 0), "kws.mode"), "eq")) == "condition.0.kws.mode.eq"


def test_field_name_cuts_each_key_to_100_characters():
    name = values.field_name(("params", "k" * 500))
    assert name == "params." + "k" * 100
