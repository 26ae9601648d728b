"""The calculator walks deep but valid trees (a chain of 499 unary minus
signs, 240 additions, 99 nested calls) without recursion, and refuses deep
non-arithmetic input with its usual message, not a RecursionError's."""

import pytest

from llama.chat.local_tools import calculate


@pytest.mark.parametrize("expression, value", [
    ("-" * 499 + "1", "-1"),
    ("-" * 498 + "1", "1"),
    ("+-" * 249 + "1", "-1"),
    ("-" * 250 + "(2 ** 3)", "8"),
    ("1+" * 249 + "1", "250"),
    ("abs(" * 99 + "-1" + ")" * 99, "1"),
    ("2 - 3 * 4 + 10 // 3 - 7 % 4", "-10"),  # evaluation order and precedence as Python's
])
def test_deep_valid_expressions_are_answered(expression, value):
    assert len(expression) <= 500
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", ["~" * 450 + "1", "-" * 450 + "x", "-" * 300 + "foo(1)"])
def test_deep_invalid_expressions_say_what_is_not_arithmetic(expression):
    result = calculate(expression)
    assert result.startswith("error: ") and "is not arithmetic" in result and "recursion" not in result
    assert len(result) < 300  # the offending text is cut short
