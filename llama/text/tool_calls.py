"""Llama 3.1 tool calls: how the model writes them, how to parse them, and the
system prompt that offers tools. No torch here.

The model writes a tool call in one of these shapes (`CallSyntax`):

    <|python_tag|>brave_search.call(query="...")       builtin: brave_search, wolfram_alpha, photogen
    <|python_tag|>print(2 ** 10)                        code_interpreter: raw Python
    <|python_tag|>{"name": "f", "parameters": {...}}    custom tool as JSON (with "Environment: ipython")
    {"name": "f", "parameters": {...}}                  the same without the tag
    <function=f>{"x": 1}</function>                     custom tool, function-tag syntax

`<|python_tag|>` is a special token, so `chat_format.py` handles it; this module
only sees the text before or after it.
"""

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from typing import Any, Dict, Optional, Sequence, Union


class BuiltinTool(str, Enum):
    """The tools Llama 3.1 was trained to call by name."""

    BRAVE_SEARCH = "brave_search"
    WOLFRAM_ALPHA = "wolfram_alpha"
    PHOTOGEN = "photogen"
    CODE_INTERPRETER = "code_interpreter"  # enabled by "Environment: ipython" alone


# Builtins called as `name.call(query="...")`; code_interpreter takes raw code instead.
_CALLABLE_BUILTINS = {t.value for t in BuiltinTool} - {BuiltinTool.CODE_INTERPRETER.value}


class CallSyntax(str, Enum):
    """How a tool call is written in the tokens (see the module docstring)."""

    BUILTIN = "builtin"
    CODE = "code"
    JSON = "json"
    PLAIN_JSON = "plain_json"  # JSON without <|python_tag|>
    FUNCTION_TAG = "function_tag"

    @property
    def python_tag(self) -> bool:
        """Whether the call follows a <|python_tag|> token."""
        return self in (CallSyntax.BUILTIN, CallSyntax.CODE, CallSyntax.JSON)


def _new_call_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ToolCall:
    """One tool call in an assistant message.

    `arguments` is {"query": ...} for brave_search / wolfram_alpha / photogen,
    {"code": ...} for code_interpreter and the JSON arguments of a custom tool.
    `call_id` only links a call to its result in the application; it is not
    part of the tokens.

    `text` is the call exactly as the model wrote it (after <|python_tag|>, if
    any). A decoded call keeps it because one call can be written many ways
    (JSON spacing and key order, "type": "function" or not, quoting) and a
    dialog sent back to the model must contain the very tokens it produced.
    Calls built by hand leave it None and are written from `tool_name`,
    `arguments` and `syntax` (default: builtin syntax for builtin tools, JSON
    for custom ones). When `text` is set, it is what gets encoded: set it to
    None after changing a decoded call.
    """

    tool_name: str
    arguments: Dict[str, Any]
    call_id: str = field(default_factory=_new_call_id)
    syntax: Optional[CallSyntax] = None
    text: Optional[str] = None

    def __post_init__(self):
        self.tool_name = str(getattr(self.tool_name, "value", self.tool_name))
        if self.syntax is None:
            if self.tool_name == BuiltinTool.CODE_INTERPRETER:
                self.syntax = CallSyntax.CODE
            else:
                self.syntax = CallSyntax.BUILTIN if self.tool_name in _CALLABLE_BUILTINS else CallSyntax.JSON
        self.syntax = CallSyntax(self.syntax)

    def render(self) -> str:
        """The call's text, without <|python_tag|>; raises ValueError if
        `tool_name`, `arguments` and `syntax` do not fit together."""
        if self.text is not None:
            return self.text
        if not isinstance(self.arguments, dict):
            raise ValueError(f"arguments of {self.tool_name!r} must be a dict, got {type(self.arguments).__name__}")
        if self.syntax == CallSyntax.BUILTIN:
            if self.tool_name not in _CALLABLE_BUILTINS:
                raise ValueError(f"{self.tool_name!r} is not one of the builtin tools {sorted(_CALLABLE_BUILTINS)}")
            args = ", ".join(f"{k}={_python_literal(v)}" for k, v in self.arguments.items())
            return f"{self.tool_name}.call({args})"
        if self.syntax == CallSyntax.CODE:
            if not isinstance(self.arguments.get("code"), str):
                raise ValueError(f"a code_interpreter call needs arguments {{'code': str}}, got {self.arguments!r:.80}")
            return self.arguments["code"]
        if self.syntax == CallSyntax.FUNCTION_TAG:
            return f"<function={self.tool_name}>{json.dumps(self.arguments, ensure_ascii=False)}</function>"
        call = {"type": "function", "name": self.tool_name, "parameters": self.arguments}
        return json.dumps(call, ensure_ascii=False)


def _python_literal(value: Any) -> str:
    # JSON string escapes are valid Python escapes, and the model quotes with ".
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


# Parsing model output: it is untrusted text, so every failure means "not a call".

_FUNCTION_TAG = re.compile(r"<function=(?P<name>[\w.\-]+)>(?P<args>.*?)(?:</function>)?", re.DOTALL)


def parse_tool_call(text: str, python_tag: bool) -> Optional[ToolCall]:
    """The tool call `text` holds, or None if it holds none. Never raises.

    After <|python_tag|> (`python_tag=True`) the text is a builtin call, a JSON
    call, or else code for code_interpreter (as in Meta's reference: the tag
    addresses the ipython environment), so a call is always returned. Without
    the tag, the whole text must be a function-tag or JSON call; anything else,
    malformed or cut off, is ordinary content.
    """
    stripped = text.strip()
    if python_tag:
        call = _parse_builtin(stripped) or _parse_json(stripped, CallSyntax.JSON)
        if call is None:
            call = ToolCall(BuiltinTool.CODE_INTERPRETER.value, {"code": text}, syntax=CallSyntax.CODE)
        call.text = text
        return call
    call = _parse_function_tag(stripped) or _parse_json(stripped, CallSyntax.PLAIN_JSON)
    if call is not None:
        call.text = text
    return call


def _parse_builtin(text: str) -> Optional[ToolCall]:
    """`brave_search.call(query="...")`, parsed as Python so that escaped
    quotes, single quotes and unicode come out right."""
    try:
        node = ast.parse(text, mode="eval").body
        if not (
            isinstance(node, ast.Call) and not node.args
            and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
            and isinstance(node.func.value, ast.Name) and node.func.value.id in _CALLABLE_BUILTINS
        ):
            return None
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    if None in arguments:  # **kwargs
        return None
    return ToolCall(node.func.value.id, arguments, syntax=CallSyntax.BUILTIN)


def _parse_json(text: str, syntax: CallSyntax) -> Optional[ToolCall]:
    """{"type": "function", "name": ..., "parameters": {...}}; "type" is optional."""
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("type", "function") != "function":
        return None
    name, arguments = obj.get("name"), obj.get("parameters", obj.get("arguments"))
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return ToolCall(name, arguments, syntax=syntax)


def _parse_function_tag(text: str) -> Optional[ToolCall]:
    match = _FUNCTION_TAG.fullmatch(text)
    if match is None:
        return None
    try:
        arguments = json.loads(match["args"])
    except (ValueError, RecursionError):
        return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(match["name"], arguments, syntax=CallSyntax.FUNCTION_TAG)


# The system prompt that offers tools.


@dataclass
class ToolParam:
    """One parameter of a custom tool."""

    param_type: str  # as the model should read it: "str", "int", "float", ...
    description: str = ""
    required: bool = True


@dataclass
class ToolDefinition:
    """A custom (user-defined) tool, described to the model in the system prompt."""

    name: str
    description: str
    parameters: Dict[str, ToolParam] = field(default_factory=dict)


KNOWLEDGE_CUTOFF = "December 2023"
_MONTHS = ("January", "February", "March", "April", "May", "June", "July",
           "August", "September", "October", "November", "December")


def format_date(day: date) -> str:
    """`23 July 2024`, the form Llama 3.1 was trained on (no locale involved)."""
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def system_prompt(
    builtin_tools: Sequence[Union[BuiltinTool, str]] = (),
    custom_tools: Sequence[ToolDefinition] = (),
    instructions: str = "",
    today: Optional[date] = None,
    custom_syntax: Union[CallSyntax, str] = CallSyntax.JSON,
) -> str:
    """The Llama 3.1 system prompt for a set of tools, as Meta's reference
    (llama-models) lays it out:

        Environment: ipython                 if any tool is offered
        Tools: brave_search, wolfram_alpha   builtin tools (code_interpreter is implied)
        Cutting Knowledge Date: December 2023
        Today Date: 23 July 2024

        <how to call the custom tools, and their definitions>

        <instructions>

    Meta's reference puts custom tool definitions in a user message; here they
    go into the system prompt, so that the dialog still alternates user and
    assistant. `custom_syntax` (JSON or FUNCTION_TAG) is the syntax the model is
    asked to call them in. `today` defaults to the local date.
    """
    known = [t.value for t in BuiltinTool]
    unknown = [t for t in builtin_tools if t not in known]
    if unknown:
        raise ValueError(f"unknown builtin tools {unknown}; Llama 3.1 knows {known} (describe others as custom_tools)")
    builtins = [BuiltinTool(t).value for t in builtin_tools]
    lines = []
    if builtins or custom_tools:
        lines.append("Environment: ipython")
        named = [t for t in builtins if t != BuiltinTool.CODE_INTERPRETER]
        # Without a Tools line Meta's template leaves an empty line in its place.
        lines.append(f"Tools: {', '.join(named)}" if named else "")
    lines += [f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}", f"Today Date: {format_date(today or date.today())}"]
    parts = ["\n".join(lines)]
    if custom_tools:
        parts.append(custom_tools_prompt(custom_tools, custom_syntax))
    if instructions:
        parts.append(instructions)
    return "\n\n".join(parts)


def custom_tools_prompt(tools: Sequence[ToolDefinition], syntax: Union[CallSyntax, str] = CallSyntax.JSON) -> str:
    """Instructions and definitions for custom tools, in the words of Meta's
    reference templates for the JSON and the function-tag syntax."""
    syntax = CallSyntax(syntax)
    if syntax in (CallSyntax.JSON, CallSyntax.PLAIN_JSON):
        return (
            "Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            "Here is a list of functions in JSON format:\n"
            + "".join(_json_definition(t) + "\n" for t in tools)
            + "\nReturn function calls in JSON format."
        )
    if syntax == CallSyntax.FUNCTION_TAG:
        return (
            "You have access to the following functions:\n\n"
            + "".join(f"Use the function '{t.name}' to '{t.description}':\n{_tag_definition(t)}\n\n" for t in tools)
            + "Think very carefully before calling functions.\n"
            "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
            '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
            "Reminder:\n"
            "- If looking for real time information use relevant functions before falling back to brave_search\n"
            "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
            "- Required parameters MUST be specified\n"
            "- Only call one function at a time\n"
            "- Put the entire function call reply on one line"
        )
    raise ValueError(f"custom tools are called in JSON or function_tag syntax, not {syntax.value}")


def _json_definition(tool: ToolDefinition) -> str:
    # Meta's template: every parameter in a one-key object of "type": "object",
    # the required list on one line, an empty properties list over two lines.
    properties = [{name: {"type": "object", "description": p.description}} for name, p in tool.parameters.items()]
    required = [name for name, p in tool.parameters.items() if p.required]
    definition = {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": {"type": "object", "properties": properties, "required": "\0required"},
        },
    }
    text = json.dumps(definition, indent=4, ensure_ascii=False)
    text = text.replace('"\\u0000required"', json.dumps(required, ensure_ascii=False))
    return text.replace('"properties": []', '"properties": [\n            ]')


def _tag_definition(tool: ToolDefinition) -> str:
    # As llama-models' template writes it: name and description as they are
    # (non-ASCII as characters; quotes escaped here, so the line stays JSON),
    # parameters through Jinja's `tojson` (sorted keys, non-ASCII and <>&' escaped).
    params = {
        name: {"description": p.description, "param_type": p.param_type, "required": p.required}
        for name, p in tool.parameters.items()
    }
    params_json = json.dumps(params, sort_keys=True)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        params_json = params_json.replace(char, escape)
    return (
        f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, '
        f'"description": {json.dumps(tool.description, ensure_ascii=False)}, "parameters": {params_json}}}'
    )
