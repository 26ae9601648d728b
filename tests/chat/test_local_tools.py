"""The interactive chat's local tools: a safe calculator, a clock, dispatch."""

import re
from datetime import datetime, timedelta, timezone

import pytest

from llama import ToolCall
from llama.chat.local_tools import LOCAL_TOOLS, calculate, current_time, run_tool_call


@pytest.mark.parametrize("expression, value", [
    ("2 + 2", "4"),
    ("2 * (3 + 4) ** 2", "98"),
    ("7 / 2", "3.5"),
    ("7 // 2 + 7 % 2", "4"),
    ("-3 ** 2", "-9"),
    ("2^10", "1024"),
    ("sqrt(2) / 2", "0.707106781187"),
    ("round(pi, 3)", "3.142"),
    ("0.1 + 0.2", "0.3"),
    ("log(e ** 2)", "2"),
    ("12345678901234567890 * 98765432109876543210", "1219326311370217952237463801111263526900"),
    ("(" * 200 + "1" + ")" * 200, "1"),
])
def test_calculator(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('echo hi')", "is not arithmetic"),
    ("open('/etc/passwd').read()", "is not arithmetic"),
    ("(1).__class__", "is not arithmetic"),
    ("[x for x in range(10**9)]", "is not arithmetic"),
    ("lambda: 1", "is not arithmetic"),
    ("True + 1", "is not arithmetic"),
    ("'a' * 10", "is not arithmetic"),
    ("sqrt(x=4)", "is not arithmetic"),
    ("9 ** 9 ** 9", "too large"),
    ("2 ** 20000", "too large"),
    ("10.0 ** 400", "error: "),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "math domain error"),
    ("2 +", "is not a valid expression"),
    ("1 + " * 200 + "1", "longer than 500 characters"),
    ("1e308 * 10 > 1", "is not arithmetic"),
    ("", "give an arithmetic expression"),
])
def test_calculator_refuses_and_reports(expression, error):
    result = calculate(expression)
    assert result.startswith("error: ") and error in result


def test_calculator_refuses_non_strings():
    assert calculate(None).startswith("error: ") and calculate(42).startswith("error: ")


def test_current_time():
    fixed = datetime(2024, 7, 23, 14, 5, 9, tzinfo=timezone(timedelta(hours=2)))
    assert current_time(lambda: fixed) == "2024-07-23 14:05:09 Tuesday UTC+02:00"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z][a-z]+day UTC[+-]\d\d:\d\d", current_time())


def test_dispatch():
    assert run_tool_call(ToolCall("calculator", {"expression": "6*7"}), LOCAL_TOOLS) == "42"
    assert run_tool_call(ToolCall("calculator", {}), LOCAL_TOOLS).startswith("error: give an arithmetic expression")
    assert run_tool_call(ToolCall("code_interpreter", {"code": "import os"}), LOCAL_TOOLS) == (
        "error: code is not run here; answer without running code")
    assert run_tool_call(ToolCall("brave_search", {"query": "x"}), LOCAL_TOOLS) == (
        "error: there is no tool named 'brave_search' here; the tools are: calculator, current_time")


def test_a_failing_tool_is_reported_not_raised():
    from llama.chat.local_tools import LocalTool, ToolDefinition

    broken = {"broken": LocalTool(ToolDefinition("broken", "fails"), lambda args: 1 / 0)}
    assert run_tool_call(ToolCall("broken", {}), broken) == "error: broken failed: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("expression, error", [
    ("round(1, -10**8)", "round's digits must be an integer from -400 to 400"),
    ("round(1, 10**8)", "round's digits must be"),
    ("round(1.5, -10**18)", "round's digits must be"),
    ("round(2 ** 9000, -400)", ""),  # allowed: fast
    ("10**10**10", "too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("(-1) ** 0.5 * 10 ** 300", "not a real number"),
    ("floor(1e308) ** 10", "too large"),
    ("sqrt(2 ** 9999 * 2 ** 9999)", "too large"),
    ("2 ** 9999 * 2 ** 9999 * 2 ** 9999", "too large"),
    ("exp(10 ** 6)", "error: "),
    ("round(1e308 * 10)", "error: "),
])
def test_calculator_bounds_every_operation(expression, error):
    import time

    start = time.perf_counter()
    result = calculate(expression)
    assert time.perf_counter() - start < 0.5, expression
    if error:
        assert result.startswith("error: ") and error in result, result
