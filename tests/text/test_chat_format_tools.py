"""Llama 3.1 tool calls in the chat format: golden ids with the real Llama 3
tokenizer, decoding generated tokens to messages, and encode(decode(x)) == x."""

from datetime import date

import pytest

from llama import CallSyntax, ChatFormat, DialogError, StopReason, Tokenizer, ToolCall
from llama.text.tool_calls import system_prompt

TAG, EOM, EOT = 128010, 128008, 128009


@pytest.fixture(scope="module")
def fmt(llama3_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(llama3_tokenizer_path))


@pytest.fixture(scope="module")
def fmt2(sp_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(sp_tokenizer_path))


def ids(fmt, *parts):
    """Token ids of text parts and special-token ids, in order."""
    out = []
    for part in parts:
        out += [part] if isinstance(part, int) else fmt.tokenizer.encode(part, bos=False, eos=False)
    return out


SYSTEM = system_prompt(["brave_search", "wolfram_alpha"], instructions="You are a helpful assistant.",
                       today=date(2024, 7, 23))
WOLFRAM_DIALOG = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the 100th decimal of pi?"},
    {"role": "assistant", "content": "", "tool_calls": [ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})]},
    {"role": "ipython", "content": '{"result": "7"}'},
    {"role": "assistant", "content": "The 100th decimal of pi is 7."},
    {"role": "user", "content": "Thanks!"},
]


def test_golden_builtin_tool_round_trip_dialog(fmt):
    """System prompt with tools, a builtin call ended by <|eom_id|>, its ipython
    result, the answer that uses it, and the next user turn."""
    tokens = fmt.encode_dialog_prompt(WOLFRAM_DIALOG)
    assert tokens == [
        128000,  # <|begin_of_text|>
        128006, 9125, 128007, 271,  # <|start_header_id|>system<|end_header_id|>\n\n
        13013, 25, 6125, 27993, 198,  # Environment: ipython\n
        16992, 25, 34300, 10947, 11, 80714, 92604, 27731, 198,  # Tools: brave_search, wolfram_alpha\n
        38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198,  # Cutting Knowledge Date: December 2023\n
        15724, 2696, 25, 220, 1419, 5887, 220, 2366, 19, 271,  # Today Date: 23 July 2024\n\n
        2675, 527, 264, 11190, 18328, 13,  # You are a helpful assistant.
        128009,  # <|eot_id|>
        128006, 882, 128007, 271,  # <|start_header_id|>user<|end_header_id|>\n\n
        3923, 374, 279, 220, 1041, 339, 12395, 315, 9115, 30,  # What is the 100th decimal of pi?
        128009,  # <|eot_id|>
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
        128010,  # <|python_tag|>
        86, 337, 92604, 27731, 8692, 10974, 429,  # wolfram_alpha.call(query="
        1041, 339, 12395, 315, 9115, 909,  # 100th decimal of pi")
        128008,  # <|eom_id|>
        128006, 23799, 4690, 128007, 271,  # <|start_header_id|>ipython<|end_header_id|>\n\n
        5018, 1407, 794, 330, 22, 9388,  # {"result": "7"}
        128009,  # <|eot_id|>
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
        791, 220, 1041, 339, 12395, 315, 9115, 374, 220, 22, 13,  # The 100th decimal of pi is 7.
        128009,  # <|eot_id|>
        128006, 882, 128007, 271,  # <|start_header_id|>user<|end_header_id|>\n\n
        12947, 0,  # Thanks!
        128009,  # <|eot_id|>
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
    ]
    # The same, as the text of Meta's llama-models prompt_format.md for Llama 3.1.
    assert fmt.tokenizer.decode(tokens) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nTools: brave_search, wolfram_alpha\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 23 July 2024\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the 100th decimal of pi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"result": "7"}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe 100th decimal of pi is 7.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_golden_code_interpreter_call(fmt):
    call = ToolCall("code_interpreter", {"code": "print(2 ** 10)"})
    assert fmt.encode_message({"role": "assistant", "content": "", "tool_calls": [call]}) == [
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
        128010,  # <|python_tag|>
        1374, 7, 17, 3146, 220, 605, 8,  # print(2 ** 10)
        128008,  # <|eom_id|>
    ]


def test_golden_custom_call_json(fmt):
    """With "Environment: ipython" the model writes custom calls as JSON after the tag, then eom."""
    call = ToolCall("get_weather", {"city": "Paris"})
    assert fmt.encode_message({"role": "assistant", "content": "", "tool_calls": [call]}) == [
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
        128010,  # <|python_tag|>
        5018, 1337, 794, 330, 1723, 498, 330, 609, 794, 330,  # {"type": "function", "name": "
        456, 70464, 498, 330, 14105, 794, 5324, 9103, 794, 330,  # get_weather", "parameters": {"city": "
        60704, 32075,  # Paris"}}
        128008,  # <|eom_id|>
    ]


def test_golden_custom_call_function_tag(fmt):
    """The function-tag syntax has no <|python_tag|> and ends the turn (prompt_format.md)."""
    call = ToolCall("get_weather", {"city": "Paris"}, syntax="function_tag")
    assert fmt.encode_message({"role": "assistant", "content": "", "tool_calls": [call]}) == [
        128006, 78191, 128007, 271,  # <|start_header_id|>assistant<|end_header_id|>\n\n
        27, 1723, 29380, 70464, 89963, 9103, 794, 330, 60704, 1,  # <function=get_weather>{"city": "Paris"
        5474, 1723, 29,  # }</function>
        128009,  # <|eot_id|>
    ]


def test_stop_reason_decides_the_end_token(fmt):
    call = ToolCall("brave_search", {"query": "x"})
    msg = {"role": "assistant", "content": "", "tool_calls": [call]}
    assert fmt.encode_message(msg)[-1] == EOM
    assert fmt.encode_message({**msg, "stop_reason": StopReason.END_OF_TURN})[-1] == EOT
    assert fmt.encode_message({**msg, "stop_reason": "out_of_tokens"})[-1] == EOT
    assert fmt.encode_message({"role": "assistant", "content": "Hi", "stop_reason": "end_of_message"})[-1] == EOM
    assert fmt.encode_message({"role": "assistant", "content": "Hi"})[-1] == EOT


# Decoding: (body tokens as parts, stop reason) -> expected content and calls;
# content TEXT means the text of the body itself. Every case must also survive
# encode(decode(tokens)) unchanged.
TEXT = object()
CODE = "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\nprint(is_prime(7))"
PRETTY_JSON = '{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10"\n    }\n}'
B, J, F = CallSyntax.BUILTIN, CallSyntax.JSON, CallSyntax.FUNCTION_TAG
CASES = {
    "brave_search": ([TAG, 'brave_search.call(query="latest price of 1oz gold")'], "end_of_message",
                     "", [("brave_search", {"query": "latest price of 1oz gold"}, B)]),
    "wolfram_alpha": ([TAG, 'wolfram_alpha.call(query="100th decimal of pi")'], "end_of_message",
                      "", [("wolfram_alpha", {"query": "100th decimal of pi"}, B)]),
    "photogen": ([TAG, 'photogen.call(query="a llama wearing a beret")'], "end_of_message",
                 "", [("photogen", {"query": "a llama wearing a beret"}, B)]),
    "nested_quotes": ([TAG, r'brave_search.call(query="who said \"I\'m here\"?")'], "end_of_message",
                      "", [("brave_search", {"query": "who said \"I'm here\"?"}, B)]),
    "unicode_query": ([TAG, 'brave_search.call(query="météo à Zürich 🦙")'], "end_of_message",
                      "", [("brave_search", {"query": "météo à Zürich 🦙"}, B)]),
    "code": ([TAG, CODE], "end_of_message", "", [("code_interpreter", {"code": CODE}, CallSyntax.CODE)]),
    "json": ([TAG, PRETTY_JSON], "end_of_message", "", [("trending_songs", {"n": "10"}, J)]),
    "json_untagged": (['{"name": "get_weather", "parameters": {"city": "São Paulo"}}'], "end_of_turn",
                      "", [("get_weather", {"city": "São Paulo"}, CallSyntax.PLAIN_JSON)]),
    "function_tag": (['<function=trending_songs>{"n": 10}</function>'], "end_of_turn",
                     "", [("trending_songs", {"n": 10}, F)]),
    "function_tag_eom": (['<function=get_weather>{"city": "東京", "note": "say \\"hi\\""}</function>'], "end_of_message",
                         "", [("get_weather", {"city": "東京", "note": 'say "hi"'}, F)]),
    "text_then_call": (["Let me look that up.", TAG, 'brave_search.call(query="Paris weather")'], "end_of_message",
                       "Let me look that up.", [("brave_search", {"query": "Paris weather"}, B)]),
    "two_calls": ([TAG, 'brave_search.call(query="a")', TAG, "print(1)"], "end_of_message",
                  "", [("brave_search", {"query": "a"}, B), ("code_interpreter", {"code": "print(1)"}, CallSyntax.CODE)]),
    "plain_eot": (["The capital of France is Paris. ¿Y tú? 🦙"], "end_of_turn", TEXT, []),
    "plain_eom": (["I will need a tool for that."], "end_of_message", TEXT, []),
    "truncated_text": (["The capital of France is"], "out_of_tokens", TEXT, []),
    "truncated_function_tag": (['<function=get_weather>{"city": "Par'], "out_of_tokens", TEXT, []),
    "truncated_after_tag": ([TAG, 'brave_search.call(query="Par'], "out_of_tokens",
                            "", [("code_interpreter", {"code": 'brave_search.call(query="Par'}, CallSyntax.CODE)]),
    "malformed_json": (['{"name": "get_weather", "parameters": {"city": "Paris",}}'], "end_of_turn", TEXT, []),
    "malformed_function_args": (["<function=get_weather>{city: Paris}</function>"], "end_of_turn", TEXT, []),
    "json_that_is_no_call": (['{"city": "Paris", "temperature": 21}'], "end_of_turn", TEXT, []),
    "empty": ([], "out_of_tokens", "", []),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_assistant_message(fmt, case):
    parts, reason, content, calls = CASES[case]
    msg = fmt.decode_assistant_message(ids(fmt, *parts), StopReason(reason))
    content = "".join(parts) if content is TEXT else content
    assert msg["role"] == "assistant" and msg["content"] == content and msg["stop_reason"] == reason
    assert [(c.tool_name, c.arguments, c.syntax) for c in msg["tool_calls"]] == calls
    assert all(c.call_id for c in msg["tool_calls"])


@pytest.mark.parametrize("case", CASES)
def test_encode_of_decode_gives_back_the_tokens(fmt, case):
    parts, reason, _, _ = CASES[case]
    body = ids(fmt, *parts)
    msg = fmt.decode_assistant_message(body, reason)
    expected = fmt.encode_header("assistant") + body + [EOM if reason == "end_of_message" else EOT]
    assert fmt.encode_message(msg) == expected
    # ... and the message goes back into a dialog as it is.
    user = {"role": "user", "content": "Hi"}
    dialog = [user, msg, {"role": "ipython" if msg["tool_calls"] else "user", "content": "ok"}]
    start = 1 + len(fmt.encode_message(user))
    assert fmt.encode_dialog_prompt(dialog)[start : start + len(expected)] == expected


def test_decode_takes_the_stop_reason_from_a_trailing_stop_token(fmt):
    body = ids(fmt, TAG, 'brave_search.call(query="x")')
    assert fmt.decode_assistant_message(body + [EOM], "out_of_tokens")["stop_reason"] == StopReason.END_OF_MESSAGE
    assert fmt.decode_assistant_message(body + [EOT], "out_of_tokens")["stop_reason"] == StopReason.END_OF_TURN


def test_decoded_calls_keep_their_text_and_ids_are_unique(fmt):
    body = ids(fmt, TAG, '{"name":"f","parameters":{"x":1}}')
    a, b = (fmt.decode_assistant_message(body, "end_of_message")["tool_calls"][0] for _ in range(2))
    assert a.text == '{"name":"f","parameters":{"x":1}}' and a.arguments == {"x": 1}
    assert a.call_id != b.call_id


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": "x", "tool_calls": [ToolCall("f", {})]},
     r"message 0 \(user\) has tool_calls; only assistant messages make tool calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"tool_name": "f"}]},
     "message 1 tool_calls must be a list of llama.ToolCall"),
    ({"role": "assistant", "content": "", "tool_calls": ToolCall("f", {})}, "message 1 tool_calls must be a list"),
    ({"role": "assistant", "content": "", "tool_calls": [ToolCall("code_interpreter", {})]},
     r"message 1, tool call 0: a code_interpreter call needs arguments \{'code': str\}"),
    ({"role": "assistant", "content": "", "stop_reason": "done"}, "message 1 has stop_reason 'done'; use one of"),
])
def test_bad_tool_fields(fmt, message, error):
    dialog = [message]
    if message["role"] == "assistant":
        dialog = [{"role": "user", "content": "q"}, message, {"role": "user", "content": "x"}]
    with pytest.raises(DialogError, match=error):
        fmt.encode_dialog_prompt(dialog)


def test_llama2_says_tools_need_llama31(fmt2):
    with pytest.raises(DialogError, match=r"message 2 is a tool result \(role ipython\), but tool calling needs Llama 3.1"):
        fmt2.encode_dialog_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "ipython", "content": "c"}])
    call = ToolCall("brave_search", {"query": "x"})
    dialog = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "user", "content": "c"}]
    with pytest.raises(DialogError, match="message 1 is an assistant message with tool calls, but tool calling needs"):
        fmt2.encode_dialog_prompt(dialog)


def test_llama2_decodes_plain_messages(fmt2):
    tokens = fmt2.tokenizer.encode("Hello there", bos=False, eos=True)
    msg = fmt2.decode_assistant_message(tokens, "out_of_tokens")  # the trailing eos says otherwise
    assert msg == {"role": "assistant", "content": "Hello there", "tool_calls": [],
                   "stop_reason": StopReason.END_OF_TURN}
