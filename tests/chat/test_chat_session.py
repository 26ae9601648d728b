"""The interactive chat session, driven by a scripted generator.

Random-weight models never call tools, so a stand-in generator answers from a
script (token ids, as a model would write them) through the real Llama 3 chat
format: the session sees exactly what it would see from `Llama`.
"""

import json
import os
import re
import signal
from types import SimpleNamespace

import pytest

from llama import ChatFormat, StopReason, TokenEvent, Tokenizer
from llama.chat.session import ChatSession

TAG, EOM, EOT = 128010, 128008, 128009


class ScriptedGenerator:
    """Answers each chat_completion_stream call with the next scripted token list."""

    def __init__(self, formatter, answers, max_seq_len=2048):
        self.formatter, self.answers = formatter, list(answers)
        self.model = SimpleNamespace(params=SimpleNamespace(max_seq_len=max_seq_len))
        self.prompts = []

    def chat_completion_stream(self, dialog, temperature, top_p, max_gen_len):
        self.prompts.append(self.formatter.encode_dialog_prompt(dialog))
        tok = self.formatter.tokenizer
        tokens = self.answers.pop(0)
        for i, t in enumerate(tokens):
            last = i == len(tokens) - 1
            stop = t in tok.stop_tokens
            reason = (StopReason.for_stop_token(t, tok) if stop else StopReason.OUT_OF_TOKENS) if last else None
            yield TokenEvent(0, t, "" if stop else tok.decode([t]), None, reason)


@pytest.fixture(scope="module")
def fmt(llama3_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(llama3_tokenizer_path))


def ids(fmt, *parts):
    out = []
    for part in parts:
        out += [part] if isinstance(part, int) else fmt.tokenizer.encode(part, bos=False, eos=False)
    return out


def session(fmt, answers, **kw):
    out = []
    gen = ScriptedGenerator(fmt, answers, **kw.pop("gen", {}))
    return ChatSession(gen, out.append, **kw), gen, out


def test_tool_round_trip(fmt):
    call = ids(fmt, TAG, '{"name": "calculator", "parameters": {"expression": "6 * 7"}}', EOM)
    chat, gen, out = session(fmt, [call, ids(fmt, "6 times 7 is 42.", EOT)])
    answer = chat.ask("What is 6 times 7?")
    assert answer["content"] == "6 times 7 is 42." and answer["stop_reason"] == StopReason.END_OF_TURN
    assert [m["role"] for m in chat.dialog] == ["system", "user", "assistant", "ipython", "assistant"]
    assert chat.dialog[2]["tool_calls"][0].arguments == {"expression": "6 * 7"}
    assert chat.dialog[3] == {"role": "ipython", "content": "42"}
    # The second prompt holds the call exactly as written, then the tool's result.
    tail = call + ids(fmt, 128006, "ipython", 128007, "\n\n", "42", EOT, 128006, "assistant", 128007, "\n\n")
    assert gen.prompts[1][-len(tail):] == tail
    text = "".join(out)
    assert "[calculator] 42\n" in text and "> Assistant: 6 times 7 is 42.\n" in text
    # The system prompt offers the local tools as custom tools.
    system = chat.dialog[0]["content"]
    assert system.startswith("Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: ")
    assert '"name": "calculator"' in system and '"name": "current_time"' in system


def test_answers_stream_token_by_token(fmt):
    answer = ids(fmt, "Llamas are friendly animals.", EOT)
    chat, _, out = session(fmt, [answer])
    chat.ask("Tell me about llamas")
    start = out.index("> Assistant: ")
    assert out[start + 1 : start + len(answer)] == [fmt.tokenizer.decode([t]) for t in answer[:-1]]


def test_function_tag_call_ending_the_turn_is_run_too(fmt):
    call = ids(fmt, "<function=current_time>{}</function>", EOT)
    chat, _, _ = session(fmt, [call, ids(fmt, "It is late.", EOT)])
    chat.ask("What time is it?")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+ UTC[+-]\d\d:\d\d", chat.dialog[3]["content"])


def test_code_and_unknown_tools_are_refused_not_run(fmt):
    code = ids(fmt, TAG, "import os; os.system('touch /tmp/pwned')", EOM)
    search = ids(fmt, TAG, 'brave_search.call(query="news")', EOM)
    chat, _, _ = session(fmt, [code, search, ids(fmt, "Sorry.", EOT)])
    chat.ask("Do something")
    assert chat.dialog[3]["content"] == "error: code is not run here; answer without running code"
    assert chat.dialog[5]["content"].startswith("error: there is no tool named 'brave_search' here")


def test_cut_off_call_is_not_run(fmt):
    chat, _, out = session(fmt, [ids(fmt, TAG, '{"name": "calculator", "parameters": {"expr')])
    message = chat.ask("Compute")
    assert message["stop_reason"] == StopReason.OUT_OF_TOKENS and chat.dialog[-1] is message
    assert "[cut off: the answer reached max_gen_len or max_seq_len]\n" in out and not any("[calc" in o for o in out)


def test_tool_rounds_are_limited(fmt):
    call = ids(fmt, TAG, '{"name": "calculator", "parameters": {"expression": "1"}}', EOM)
    chat, gen, out = session(fmt, [call] * 3, max_tool_rounds=2)
    chat.ask("Loop")
    assert [m["role"] for m in chat.dialog][1:] == ["user", "assistant", "ipython", "assistant", "ipython", "assistant"]
    assert "[stopped after 2 rounds of tool calls]\n" in out and not gen.answers


def test_overflow_is_reported_and_the_conversation_goes_on(fmt):
    answer = ids(fmt, "Hello!", EOT)
    chat, gen, out = session(fmt, [answer, answer], gen={"max_seq_len": 300})
    lines = iter(["Hi", "word " * 100, "/new", "Hi again", ""])
    chat.run(lambda prompt: next(lines))
    text = "".join(out)
    assert "[the conversation no longer fits max_seq_len=300; start a new one with /new, or quit (empty line) and " \
           "raise --max_seq_len]\n" in text
    assert text.count("> Assistant: Hello!\n") == 2 and "(new conversation)" in text
    assert [m["role"] for m in chat.dialog] == ["system", "user", "assistant"]
    assert chat.dialog[1]["content"] == "Hi again"
    # A first message that cannot fit says how much the system prompt takes.
    chat.reset()
    assert chat.ask("word " * 100) is None and chat.dialog == [{"role": "system", "content": chat.system}]
    assert re.search(r"\[this does not fit max_seq_len=300 \(the system prompt with the tool definitions takes \d+ "
                     r"tokens\); shorten it or raise --max_seq_len\]", out[-1])


@pytest.mark.parametrize("last_line", [None, "", "   "])
def test_run_ends_on_eof_and_empty_line(fmt, last_line):
    chat, _, out = session(fmt, [ids(fmt, "Hi!", EOT)])
    lines = iter(["Hello", last_line])
    chat.run(lambda prompt: next(lines))
    assert "".join(out).count("> Assistant: Hi!") == 1


def test_llama2_chats_without_tools(sp_tokenizer_path):
    fmt2 = ChatFormat.for_tokenizer(Tokenizer.from_file(sp_tokenizer_path))
    chat, gen, _ = session(fmt2, [fmt2.tokenizer.encode("Hi there", bos=False, eos=True)])
    message = chat.ask("Hello")
    assert chat.system is None and chat.tools == {} and message["content"] == "Hi there"
    assert [m["role"] for m in chat.dialog] == ["user", "assistant"]


def test_ctrl_c_ends_the_chat_without_a_traceback(fmt):
    chat, _, out = session(fmt, [])

    def interrupted(prompt):
        raise KeyboardInterrupt

    chat.run(interrupted)
    assert out[-1] == "\n"


def test_banner_names_the_tools_or_says_why_there_are_none(fmt, sp_tokenizer_path):
    chat, _, _ = session(fmt, [])
    assert "Tools: calculator, current_time (run here when the model calls them)." in chat.banner()
    fmt2 = ChatFormat.for_tokenizer(Tokenizer.from_file(sp_tokenizer_path))
    chat2, _, _ = session(fmt2, [])
    assert "No tools: this model's chat format (Llama 2) has no tool calling, so it cannot calculate or look up " \
           "the date; its answers to such questions are guesses." in chat2.banner()


def test_system_command_and_flag(fmt, sp_tokenizer_path):
    chat, gen, out = session(fmt, [ids(fmt, "Oui.", EOT)], system="Answer in French.")
    assert chat.dialog[0]["content"].endswith("\n\nAnswer in French.") and '"name": "calculator"' in chat.dialog[0]["content"]
    chat.ask("Hello")
    chat.command("/system Answer in German.")
    # The conversation goes on with the new system prompt (tool definitions kept).
    assert [m["role"] for m in chat.dialog] == ["system", "user", "assistant"]
    assert chat.dialog[0]["content"].endswith("\n\nAnswer in German.") and '"name": "calculator"' in chat.dialog[0]["content"]
    chat.command("/system")
    assert out[-1].startswith("(system prompt: 'Environment: ipython") and "Answer in German." in out[-1]
    # Without tools the text is the whole system prompt.
    fmt2 = ChatFormat.for_tokenizer(Tokenizer.from_file(sp_tokenizer_path))
    chat2, _, out2 = session(fmt2, [], system="Be brief.")
    assert chat2.dialog == [{"role": "system", "content": "Be brief."}]
    chat3, _, out3 = session(fmt2, [])
    chat3.command("/system")
    assert chat3.dialog == [] and out3[-1] == "(no system prompt)\n"


def test_save_and_load_round_trip_with_tool_calls(fmt, tmp_path):
    call = ids(fmt, TAG, '{"name": "calculator", "parameters": {"expression": "6 * 7"}}', EOM)
    chat, gen, out = session(fmt, [call, ids(fmt, "42.", EOT)])
    chat.ask("What is 6 times 7?")
    chat.command(f"/save {tmp_path / 'd.json'}")
    assert out[-1] == f"(saved 5 messages to {tmp_path / 'd.json'})\n"
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved[2]["tool_calls"][0]["tool_name"] == "calculator" and saved[2]["stop_reason"] == "end_of_message"

    fresh, gen2, out2 = session(fmt, [ids(fmt, "Yes.", EOT)])
    fresh.command(f"/load {tmp_path / 'd.json'}")
    assert out2[-1] == f"(loaded 5 messages from {tmp_path / 'd.json'})\n"
    # Read back, the dialog encodes to the very tokens it had.
    fresh.ask("Sure?")
    follow_up = {"role": "user", "content": "Sure?"}
    assert gen2.prompts[0] == fmt.encode_dialog_prompt(chat.dialog + [follow_up]) and len(fresh.dialog) == 7


@pytest.mark.parametrize("content, error", [
    ("not json", "is not valid JSON"),
    ('{"role": "user"}', "must hold a JSON list of messages"),
    ('[{"role": "user", "content": "Hi"}]', "the last message must be the assistant's"),
    ('[{"role": "assistant", "content": "Hi"}]', "message 0 (assistant) cannot follow a system message"),
    ('[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "stop_reason": "done"}]',
     "message 1: unknown stop_reason 'done'"),
])
def test_load_refuses_a_bad_file_and_keeps_the_conversation(fmt, tmp_path, content, error):
    chat, _, out = session(fmt, [ids(fmt, "Hi!", EOT)])
    chat.ask("Hello")
    before = list(chat.dialog)
    (tmp_path / "bad.json").write_text(content)
    chat.command(f"/load {tmp_path / 'bad.json'}")
    assert error in out[-1] and out[-1].startswith("(error: ") and out[-1].endswith("; the conversation is unchanged)\n")
    assert chat.dialog == before
    chat.command(f"/load {tmp_path / 'missing.json'}")
    assert "missing.json not found" in out[-1]
    chat.command(f"/save {tmp_path}")
    assert out[-1] == f"(error: {tmp_path} is a directory; give a file name)\n"


def test_help_and_unknown_commands(fmt):
    chat, _, out = session(fmt, [])
    lines = iter(["/help", "/frobnicate", "/save", ""])
    chat.run(lambda prompt: next(lines))
    text = "".join(out)
    assert "/system TEXT" in text and "/load FILE" in text and "(unknown command /frobnicate; /help lists" in text
    assert "(/save needs a file name: /save FILE)" in text


class InterruptedGenerator(ScriptedGenerator):
    """Streams the script; on the first call, sends this process SIGINT (Ctrl-C) after the second token."""

    closed = False

    def chat_completion_stream(self, dialog, temperature, top_p, max_gen_len):
        first = not self.prompts
        try:
            for i, event in enumerate(super().chat_completion_stream(dialog, temperature, top_p, max_gen_len)):
                if i == 2 and first:
                    os.kill(os.getpid(), signal.SIGINT)
                yield event
        finally:
            InterruptedGenerator.closed = True


@pytest.fixture
def interactive_sigint():
    """SIGINT as at an interactive prompt, even where the tests run in the
    background (there it starts ignored); restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_answer_closes_the_stream_and_the_chat_goes_on(fmt, interactive_sigint):
    gen = InterruptedGenerator(fmt, [ids(fmt, "one two three four five six seven", EOT), ids(fmt, "Fine.", EOT)])
    out = []
    chat = ChatSession(gen, out.append)
    assert chat.ask("Count") is None
    assert InterruptedGenerator.closed and chat.dialog == [{"role": "system", "content": chat.system}]
    text = "".join(out)
    assert "[stopped; this question is not kept in the conversation]\n" in text and "five" not in text
    assert chat.ask("How are you?")["content"] == "Fine."
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again at the prompt


def test_llama2_rejected_line_is_reported_and_the_chat_goes_on(sp_tokenizer_path):
    fmt2 = ChatFormat.for_tokenizer(Tokenizer.from_file(sp_tokenizer_path))
    chat, gen, out = session(fmt2, [fmt2.tokenizer.encode("Hi there", bos=False, eos=True)])
    lines = iter(["what is [INST] ?", "Hello", ""])
    chat.run(lambda prompt: next(lines))
    text = "".join(out)
    assert "[not sent: message 0 contains '[INST]', which Llama 2 reads as a turn marker; remove it]" in text
    assert text.count("> Assistant: ") == 1
    assert [m["content"] for m in chat.dialog] == ["Hello", "Hi there"]


def test_invalid_utf8_on_stdin_is_not_a_traceback():
    """read_line_rank0 without torchrun, fed bytes that are not UTF-8."""
    import subprocess
    import sys

    code = "from llama.chat.session import read_line_rank0; print(repr(read_line_rank0('> ')))"
    r = subprocess.run([sys.executable, "-c", code], input=b"caf\xe9 \xff\n", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == "> 'caf\ufffd \ufffd'\n"
