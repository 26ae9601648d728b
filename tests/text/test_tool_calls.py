"""Tool-call text: parsing what the model writes, writing calls, the system prompt.

Token-level behaviour (<|python_tag|>, eom/eot, round trips) is in
test_chat_format_tools.py; this file needs no tokenizer and no torch.
"""

import json
from datetime import date

import pytest

from llama.text.tool_calls import (
    CallSyntax, ToolCall, ToolDefinition, ToolParam, custom_tools_prompt, format_date, parse_tool_call, system_prompt,
)


@pytest.mark.parametrize("text, name, arguments", [
    ('brave_search.call(query="latest price of 1oz gold")', "brave_search", {"query": "latest price of 1oz gold"}),
    ('wolfram_alpha.call(query="100th decimal of pi")', "wolfram_alpha", {"query": "100th decimal of pi"}),
    ('photogen.call(query="a llama in Paris")', "photogen", {"query": "a llama in Paris"}),
    # Nested and escaped quotes, single quotes, unicode, escapes, spaces around.
    (r'brave_search.call(query="who said \"hi\" (and \\ why)?")', "brave_search",
     {"query": 'who said "hi" (and \\ why)?'}),
    ("brave_search.call(query='it\\'s \"quoted\"')", "brave_search", {"query": "it's \"quoted\""}),
    ('wolfram_alpha.call(query="∫ x² dx, 🦙")', "wolfram_alpha", {"query": "∫ x² dx, 🦙"}),
    (' brave_search.call(query="a\\nb", count=3) \n', "brave_search", {"query": "a\nb", "count": 3}),
])
def test_builtin_calls(text, name, arguments):
    call = parse_tool_call(text, python_tag=True)
    assert (call.tool_name, call.arguments, call.syntax, call.text) == (name, arguments, CallSyntax.BUILTIN, text)


@pytest.mark.parametrize("text", [
    "print(2 ** 10)",
    "def is_prime(n):\n    if n <= 1\n        return False\nprint(is_prime(7))",  # invalid Python is still code
    'get_weather.call(query="Paris")',  # not a builtin tool: a Python expression like any other
    'brave_search.call(query=some_variable)',  # not a literal
    'brave_search.call("positional")',
    'brave_search.call(query="cut off',
    '{"name": "f", "parameters": {"x": 1}',  # malformed JSON after the tag
    "",
])
def test_text_after_python_tag_that_is_no_call_is_code(text):
    call = parse_tool_call(text, python_tag=True)
    expected = ("code_interpreter", {"code": text}, CallSyntax.CODE, text)
    assert (call.tool_name, call.arguments, call.syntax, call.text) == expected


@pytest.mark.parametrize("text, name, arguments", [
    ('{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}',
     "trending_songs", {"n": "10", "genre": "all"}),
    ('{\n    "name": "get_weather",\n    "parameters": {"city": "São Paulo", "note": "say \\"hi\\""}\n}',
     "get_weather", {"city": "São Paulo", "note": 'say "hi"'}),
    ('{"name": "f", "arguments": {"nested": {"a": [1, 2, {"b": null}]}}}', "f", {"nested": {"a": [1, 2, {"b": None}]}}),
])
def test_json_calls_with_and_without_tag(text, name, arguments):
    for tag, syntax in ((True, CallSyntax.JSON), (False, CallSyntax.PLAIN_JSON)):
        call = parse_tool_call(text, python_tag=tag)
        assert (call.tool_name, call.arguments, call.syntax, call.text) == (name, arguments, syntax, text)


@pytest.mark.parametrize("text, name, arguments", [
    ('<function=trending_songs>{"n": 10}</function>', "trending_songs", {"n": 10}),
    ('<function=get_weather>{"city": "Zürich", "q": "a \\"b\\" </function>"}</function>\n',
     "get_weather", {"city": "Zürich", "q": 'a "b" </function>'}),
    ('<function=spotify.top-5>{}', "spotify.top-5", {}),  # the model may stop before </function>
])
def test_function_tag_calls(text, name, arguments):
    call = parse_tool_call(text, python_tag=False)
    assert (call.tool_name, call.arguments, call.syntax, call.text) == (name, arguments, CallSyntax.FUNCTION_TAG, text)


@pytest.mark.parametrize("text", [
    "The answer is 42.",
    '<function=get_weather>{"city": "Paris"',  # cut off
    "<function=get_weather>{'city': 'Paris'}</function>",  # not JSON
    '<function=get_weather>["Paris"]</function>',  # arguments must be an object
    'Sure! <function=get_weather>{"city": "Paris"}</function>',  # must be the whole answer
    '{"name": "Bob", "age": 3}',  # JSON, but no call
    '{"type": "object", "name": "f", "parameters": {}}',
    '{"name": "f", "parameters": "x=1"}',
    '{"name": "f", "parameters": {"x": 1}',  # malformed
    'brave_search.call(query="x")',  # builtin calls need the tag
    "[" * 100_000,  # deeper than json's recursion limit
    "{" * 50_000 + "}" * 50_000,
])
def test_text_without_tag_that_is_no_call_is_content(text):
    assert parse_tool_call(text, python_tag=False) is None


def test_parsing_never_raises_on_nasty_text():
    nasty = ["(" * 10_000, "brave_search.call(query=" + "[" * 5_000, "\x00", "brave_search.call(query={[1]: 2})",
             "brave_search.call(**kw)", "wolfram_alpha.call(query=1e999999)", "\ud800", "<function=f>" + "[" * 100_000]
    for text in nasty:
        for tag in (True, False):
            parse_tool_call(text, python_tag=tag)


@pytest.mark.parametrize("call, text", [
    (ToolCall("brave_search", {"query": 'who said "hi"?'}), 'brave_search.call(query="who said \\"hi\\"?")'),
    (ToolCall("code_interpreter", {"code": "print(1)"}), "print(1)"),
    (ToolCall("get_weather", {"city": "Zürich"}),
     '{"type": "function", "name": "get_weather", "parameters": {"city": "Zürich"}}'),
    (ToolCall("get_weather", {"city": "Paris"}, syntax="function_tag"),
     '<function=get_weather>{"city": "Paris"}</function>'),
    (ToolCall("f", {}, syntax=CallSyntax.PLAIN_JSON), '{"type": "function", "name": "f", "parameters": {}}'),
    (ToolCall("f", {"x": 1}, text='{"name":"f","parameters":{"x":1}}'), '{"name":"f","parameters":{"x":1}}'),
])
def test_calls_built_by_hand_render_as_the_model_writes_them_and_parse_back(call, text):
    assert call.render() == text
    parsed = parse_tool_call(text, python_tag=call.syntax.python_tag)
    assert (parsed.tool_name, parsed.arguments, parsed.syntax) == (call.tool_name, call.arguments, call.syntax)


def test_default_syntax_and_ids():
    assert ToolCall("brave_search", {"query": "x"}).syntax == CallSyntax.BUILTIN
    assert ToolCall("code_interpreter", {"code": "x"}).syntax == CallSyntax.CODE
    assert ToolCall("my_tool", {}).syntax == CallSyntax.JSON
    assert ToolCall("f", {}).call_id != ToolCall("f", {}).call_id


@pytest.mark.parametrize("call, message", [
    (ToolCall("my_tool", {}, syntax="builtin"), "'my_tool' is not one of the builtin tools"),
    (ToolCall("code_interpreter", {"query": "x"}), "a code_interpreter call needs arguments {'code': str}"),
    (ToolCall("f", ["x"]), "arguments of 'f' must be a dict"),
])
def test_inconsistent_calls_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call.render()


# The system prompt, compared with the text Meta's reference (llama-models
# 0.1.2, prompt_templates + LLama31Interface.system_messages) renders for the
# same tools; test_llama_models_oracle.py checks it against the code itself.

TODAY = date(2024, 7, 23)
SONGS = ToolDefinition("trending_songs", "Returns the trending songs on a Music site", {
    "n": ToolParam("int", "The number of songs to return", required=True),
    "genre": ToolParam("str", "The genre of the songs to return", required=False),
})


def test_system_prompt_builtin_tools():
    tools = ["code_interpreter", "brave_search", "wolfram_alpha"]
    text = system_prompt(tools, instructions="You are a helpful assistant.", today=TODAY)
    assert text == (
        "Environment: ipython\n"
        "Tools: brave_search, wolfram_alpha\n"
        "Cutting Knowledge Date: December 2023\n"
        "Today Date: 23 July 2024\n"
        "\n"
        "You are a helpful assistant."
    )


def test_system_prompt_code_interpreter_only_and_no_tools():
    # Meta's template leaves an empty line where the Tools line would be.
    assert system_prompt(["code_interpreter"], today=date(2024, 9, 1)) == (
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 01 September 2024"
    )
    assert system_prompt(instructions="Be brief.", today=TODAY) == (
        "Cutting Knowledge Date: December 2023\nToday Date: 23 July 2024\n\nBe brief."
    )


def test_system_prompt_custom_tools_json():
    text = system_prompt(custom_tools=[SONGS], instructions="You are a helpful assistant.", today=TODAY)
    assert text == (
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 23 July 2024\n\n"
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "trending_songs",\n'
        '        "description": "Returns the trending songs on a Music site",\n'
        '        "parameters": {\n            "type": "object",\n            "properties": [\n'
        '                {\n                    "n": {\n                        "type": "object",\n'
        '                        "description": "The number of songs to return"\n'
        '                    }\n                },\n'
        '                {\n                    "genre": {\n                        "type": "object",\n'
        '                        "description": "The genre of the songs to return"\n'
        '                    }\n                }\n'
        '            ],\n            "required": ["n"]\n        }\n    }\n}\n'
        "\nReturn function calls in JSON format.\n\n"
        "You are a helpful assistant."
    )


def test_custom_tools_function_tag():
    now = ToolDefinition("current_time", "Current date and time")
    assert custom_tools_prompt([SONGS, now], "function_tag") == (
        "You have access to the following functions:\n\n"
        "Use the function 'trending_songs' to 'Returns the trending songs on a Music site':\n"
        '{"name": "trending_songs", "description": "Returns the trending songs on a Music site", "parameters": '
        '{"genre": {"description": "The genre of the songs to return", "param_type": "str", "required": false}, '
        '"n": {"description": "The number of songs to return", "param_type": "int", "required": true}}}\n\n'
        "Use the function 'current_time' to 'Current date and time':\n"
        '{"name": "current_time", "description": "Current date and time", "parameters": {}}\n\n'
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )


def test_format_date_and_bad_tools():
    assert format_date(date(2024, 7, 3)) == "03 July 2024"
    with pytest.raises(ValueError, match=r"unknown builtin tools \['google'\]; Llama 3.1 knows"):
        system_prompt(["google"])
    with pytest.raises(ValueError, match="custom tools are called in JSON or function_tag syntax, not code"):
        custom_tools_prompt([SONGS], "code")


def test_function_tag_definitions_write_characters_not_escapes():
    """As llama-models' template: name and description as characters; the
    parameters as Jinja's tojson writes them (tests/test_llama_models_oracle.py
    checks the whole prompt against Meta's code)."""
    meteo = ToolDefinition("météo", 'Météo "du jour", en °C', {"ville": ToolParam("str", "Zürich & <Genève>")})
    line = custom_tools_prompt([meteo], "function_tag").splitlines()[3]
    assert line == ('{"name": "météo", "description": "Météo \\"du jour\\", en °C", "parameters": '
                    '{"ville": {"description": "Z\\u00fcrich \\u0026 \\u003cGen\\u00e8ve\\u003e", '
                    '"param_type": "str", "required": true}}}')
    assert json.loads(line)["description"] == 'Météo "du jour", en °C'
