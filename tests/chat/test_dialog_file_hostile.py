"""Hostile and careless dialog files given to /load (issue 26, item 4): each is
refused with a message naming the file and the problem, the chat goes on,
and the conversation before the /load is intact after it.
"""

import json
import os
import time

import pytest

from llama import ChatFormat, Tokenizer
from llama.chat.dialog_file import MAX_ARGUMENT_DEPTH, MAX_MESSAGES, DialogFileError, load_dialog, save_dialog
from llama.text.messages import DialogError

from test_chat_session import EOT, ids, session


@pytest.fixture(scope="module")
def fmt(llama3_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(llama3_tokenizer_path))


def user_then(*messages):
    return [{"role": "user", "content": "Hi"}, *messages]


CALL = {"tool_name": "calculator", "arguments": {"expression": "1+1"}}
HOSTILE = {
    "deep": ("[" * 100_000 + "]" * 100_000, r"is not valid JSON \(nested too deeply\)"),
    "text is a number": (user_then({"role": "assistant", "content": "", "tool_calls": [{**CALL, "text": 5}]}),
                         "message 1, tool call 0: 'text' must be a string or null, got 5"),
    "call_id is a list": (user_then({"role": "assistant", "content": "", "tool_calls": [{**CALL, "call_id": []}]}),
                          "message 1, tool call 0: 'call_id' must be a string"),
    "arguments a string": (user_then({"role": "assistant", "content": "",
                                      "tool_calls": [{**CALL, "arguments": "x"}]}),
                           "message 1, tool call 0: 'arguments' must be an object"),
    "tool name missing": (user_then({"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}),
                          "message 1, tool call 0: 'tool_name' must be a non-empty string"),
    "bad syntax": (user_then({"role": "assistant", "content": "", "tool_calls": [{**CALL, "syntax": "morse"}]}),
                   "message 1, tool call 0: 'syntax' 'morse' is not one of"),
    "call not an object": (user_then({"role": "assistant", "content": "", "tool_calls": [7]}),
                           "message 1, tool call 0 must be an object"),
    "tool_calls an object": (user_then({"role": "assistant", "content": "", "tool_calls": {"a": 1}}),
                             "message 1: tool_calls must be a list"),
    "deep arguments": (user_then({"role": "assistant", "content": "", "tool_calls": [
        {**CALL, "arguments": json.loads('{"a": ' * 200 + "1" + "}" * 200)}]}),
        f"'arguments' nest more than {MAX_ARGUMENT_DEPTH} levels deep"),
    "stop_reason a list": (user_then({"role": "assistant", "content": "", "stop_reason": ["end_of_turn"]}),
                           "message 1: unknown stop_reason"),
    "NaN": ('[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": '
            '[{"tool_name": "f", "arguments": {"x": NaN}}]}]', r"is not valid JSON \(NaN is not a number JSON allows"),
    "not UTF-8": (b'[{"role": "user", "content": "\xff"}]', "is not valid JSON"),
    "too many messages": ("[" + ",".join(["{}"] * (MAX_MESSAGES + 1)) + "]",
                          f"holds {MAX_MESSAGES + 1:,} messages; no model's context .* holds more than "
                          f"{MAX_MESSAGES:,}: keep only the part of the conversation you need"),
    "too large": ('[{"role": "user", "content": "' + "x" * (5 << 20) + '"}]',
                  "more than the 4,194,304 a dialog file can need; give a file written by /save"),
}


def write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_is_one_clear_error(tmp_path, name):
    content, message = HOSTILE[name]
    path = write(tmp_path / "d.json", content)
    start = time.monotonic()
    with pytest.raises(DialogFileError, match=message) as info:
        load_dialog(path)
    assert time.monotonic() - start < 5
    assert str(path) in str(info.value) and isinstance(info.value, (DialogError, ValueError))


@pytest.mark.parametrize("name", list(HOSTILE))
def test_bad_load_keeps_the_conversation(fmt, tmp_path, name):
    content, message = HOSTILE[name]
    chat, _, out = session(fmt, [ids(fmt, "Hi!", EOT), ids(fmt, "Still here.", EOT)])
    chat.ask("Hello")
    before = [dict(m) for m in chat.dialog]
    chat.command(f"/load {write(tmp_path / 'd.json', content)}")
    assert out[-1].startswith("(error: ") and out[-1].endswith("; the conversation is unchanged)\n"), out[-1]
    assert chat.dialog == before
    assert chat.ask("And now?")["content"] == "Still here."  # the chat goes on with what it had


def test_files_that_are_not_files_are_refused_and_the_chat_goes_on(fmt, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    chat, _, out = session(fmt, [ids(fmt, "Hi!", EOT)])
    chat.ask("Hello")
    before = list(chat.dialog)
    start = time.monotonic()
    chat.command(f"/load {tmp_path / 'pipe'}")
    assert time.monotonic() - start < 2  # a FIFO with no writer does not hang the chat
    assert f"{tmp_path / 'pipe'} is a FIFO (named pipe), not a regular file" in out[-1]
    chat.command("/load /dev/zero")
    assert out[-1] == ("(error: /dev/zero is a character device, not a regular file; give a file written by /save, "
                       "or fix the file; the conversation is unchanged)\n")
    chat.command(f"/load {tmp_path}")
    assert "is a directory, not a regular file" in out[-1]
    assert chat.dialog == before


def test_a_dialog_longer_than_the_context_is_refused_at_load(fmt, tmp_path):
    long = [{"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time " * 200, "stop_reason": "end_of_turn"}]
    path = save_dialog(long, tmp_path / "long.json")
    chat, _, out = session(fmt, [], gen={"max_seq_len": 256})
    before = list(chat.dialog)
    chat.command(f"/load {path}")
    assert "holds a conversation of 8" in out[-1] and "more than this model's context (--max_seq_len 256) holds: " \
        "run the chat with a larger --max_seq_len" in out[-1]
    assert chat.dialog == before
    roomy, _, out2 = session(fmt, [], gen={"max_seq_len": 2048})
    roomy.command(f"/load {path}")
    assert out2[-1] == f"(loaded 2 messages from {path})\n" and len(roomy.dialog) == 2


def test_a_good_file_with_every_field_still_loads(tmp_path):
    dialog = user_then({"role": "assistant", "content": "", "stop_reason": "end_of_message", "tool_calls": [
        {**CALL, "call_id": "c1", "syntax": "json", "text": None, "ignored": 1}]},
        {"role": "ipython", "content": "2"})
    loaded = load_dialog(write(tmp_path / "d.json", dialog))
    call = loaded[1]["tool_calls"][0]
    assert (call.tool_name, call.arguments, call.call_id, call.syntax.value) == ("calculator", {"expression": "1+1"},
                                                                                 "c1", "json")
    assert len(loaded) == 3 and loaded[1]["stop_reason"].value == "end_of_message"
