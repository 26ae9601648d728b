"""Tools the interactive chat runs on this machine: a calculator and a clock.

Nothing here touches the network or runs code the model wrote: the
calculator walks the syntax tree of an arithmetic expression and allows
numbers, operators and a few math functions only. No torch here.

They are offered to the model as custom tools rather than as Llama 3.1's
builtin `wolfram_alpha`: the model sends that tool natural-language queries
("100th decimal of pi") and expects Wolfram's answers, which an arithmetic
evaluator cannot give; a custom tool says exactly what it does.
"""

import ast
import math
import operator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Dict, Mapping

from ..text.tool_calls import BuiltinTool, ToolCall, ToolDefinition, ToolParam


@dataclass
class LocalTool:
    """A custom tool: how the model sees it, and the function that answers it."""

    definition: ToolDefinition
    run: Callable[[Dict[str, Any]], str]  # arguments -> result text; reports errors as text


# The calculator's time and memory are bounded by limits on every operand, not
# by a timer: an expression has at most 500 characters (so at most ~250
# operations), every integer in it or computed by it has at most 10,000 bits,
# and no operation is given operands for which Python's own algorithm is slow
# (an integer power is refused before computing it; round(1, -10**8) would
# compute 10**(10**8)). So each operation takes microseconds, whatever the
# model writes; tests/chat/test_local_tools.py fuzzes this.
_MAX_EXPRESSION_CHARS = 500
_MAX_INT_BITS = 10_000  # beyond this, integers take long to compute and to print
_MAX_ROUND_DIGITS = 400  # floats have at most ~330 significant decimal places


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if max(base.bit_length(), 1) * exponent > _MAX_INT_BITS:
            raise OverflowError("the result is too large")
    return operator.pow(base, exponent)


def _round(x, ndigits=None):
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int) or abs(ndigits) > _MAX_ROUND_DIGITS:
        raise ValueError(f"round's digits must be an integer from -{_MAX_ROUND_DIGITS} to {_MAX_ROUND_DIGITS}")
    return round(x, ndigits)


_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power,
    ast.BitXor: _power,  # 2^10 means a power to a calculator (and to a model writing math)
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "abs": abs, "round": _round, "floor": math.floor, "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _checked(value):
    """Every intermediate result is a real number of bounded size."""
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise OverflowError("the result is too large")
    if not isinstance(value, (int, float)):  # (-8) ** 0.5 is complex
        raise ValueError("the result is not a real number")
    return value


def _operands(node: ast.AST, source: str):
    """The child expressions `node` computes from; a ValueError if it is not arithmetic."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return []
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return []
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return [node.operand]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return [node.left, node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if not node.keywords:
            return list(node.args)
    # The source text, not ast.unparse (recursive: a deep tree would overflow the stack).
    text = ast.get_source_segment(source, node) or type(node).__name__
    raise ValueError(f"{text[:100]!r} is not arithmetic (numbers, + - * / // % ** ^, "
                     f"{', '.join(_FUNCTIONS)}, {', '.join(_CONSTANTS)})")


def _apply(node: ast.AST, args: list):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](*args)
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](*args)
    return _FUNCTIONS[node.func.id](*args)


def _evaluate(root: ast.AST, source: str):
    """The value of the tree, children first, left to right, every result checked.

    With a stack of its own rather than recursion: "-" * 499 + "1" is a tree
    499 levels deep, which recursion (two Python frames a level) could not
    walk within Python's limit of 1,000 frames.
    """
    values: list = []
    todo = [(root, False)]  # (node, its operands are already on `values`)
    while todo:
        node, ready = todo.pop()
        if not ready:
            operands = _operands(node, source)
            todo.append((node, True))
            todo.extend((child, False) for child in reversed(operands))
            continue
        n = len(_operands(node, source))
        args = values[len(values) - n:]
        del values[len(values) - n:]
        values.append(_checked(_apply(node, args)))
    return values[0]


def calculate(expression: str) -> str:
    """Evaluates arithmetic such as "2 * (3 + 4) ** 2" or "sqrt(2) / 2"; errors come back as text."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: give an arithmetic expression as a string"
    if len(expression) > _MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {_MAX_EXPRESSION_CHARS} characters"
    try:
        source = expression.strip()
        value = _evaluate(ast.parse(source, mode="eval").body, source)
    except SyntaxError:
        return f"error: {expression!r} is not a valid expression"
    except (RecursionError, MemoryError):  # the parser's own limits (Python's, not ours)
        return "error: the expression is nested too deeply; split it into smaller steps"
    except (ArithmeticError, ValueError, TypeError) as e:
        return f"error: {e}"
    return f"{value:.12g}" if isinstance(value, float) else str(value)


def current_time(now: Callable[[], datetime] = datetime.now) -> str:
    """Local date and time with the weekday and UTC offset: "2024-07-23 14:05:09 Tuesday UTC+02:00"."""
    t = now()
    t = t if t.tzinfo else t.astimezone()  # naive local time: attach the local zone
    offset = t.strftime("%z")
    return f"{t:%Y-%m-%d %H:%M:%S} {t:%A} UTC{offset[:3]}:{offset[3:]}"


LOCAL_TOOLS: Dict[str, LocalTool] = {
    "calculator": LocalTool(
        ToolDefinition("calculator", "Evaluates an arithmetic expression and returns its value",
                       {"expression": ToolParam("str", "arithmetic such as 2 * (3 + 4) ** 2 or sqrt(2) / 2")}),
        lambda args: calculate(args.get("expression")),
    ),
    "current_time": LocalTool(
        ToolDefinition("current_time", "Returns the current local date, time and weekday"),
        lambda args: current_time(),
    ),
}


def run_tool_call(call: ToolCall, tools: Mapping[str, LocalTool]) -> str:
    """The text to send back as the tool's result (an ipython message).

    Never raises: a call to a tool that is not there, or a tool that fails,
    gives an error the model can read and act on.
    """
    if call.tool_name in tools:
        try:
            return tools[call.tool_name].run(call.arguments)
        except Exception as e:  # a tool's bug must not end the chat; the model and the user see it
            return f"error: {call.tool_name} failed: {type(e).__name__}: {e}"
    if call.tool_name == BuiltinTool.CODE_INTERPRETER:
        return "error: code is not run here; answer without running code"
    available = ", ".join(tools) or "none"
    return f"error: there is no tool named {call.tool_name!r} here; the tools are: {available}"
