"""Our Llama 3.1 tool-call format against Meta's reference code itself.

The oracle is llama-models 0.1.2 (the last release whose templates render
system prompts for tools and whose encoder writes <|python_tag|> before tool
calls, as the model does), downloaded once from PyPI into the test cache and
run in a subprocess (tests/llama_models_oracle.py); it is never installed.

Known, deliberate differences, pinned below:
* Meta's system message text ends with "\\n"; ours does not (message contents
  are stripped when encoded, here as in Meta's llama3 repository).
* Meta's reference puts custom tool definitions in a user message; we put
  them into the system prompt (so user and assistant still alternate).
* For the <function=...> syntax Meta's encoder writes <|python_tag|> first;
  the model does not (llama-models' prompt_format.md), and neither do we.
"""

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from datetime import date
from pathlib import Path

import pytest

from conftest import CACHE, REPO
from llama import ChatFormat, Tokenizer, ToolCall
from llama.text.tool_calls import ToolDefinition, ToolParam, custom_tools_prompt, system_prompt

pytestmark = pytest.mark.slow

VERSION = "0.1.2"
TAG = 128010
INSTRUCTION = "You are a helpful assistant."
SONGS = ToolDefinition("trending_songs", "Returns the trending songs on a Music site", {
    "n": ToolParam("int", "The number of songs to return", required=True),
    "genre": ToolParam("str", "The genre of the songs to return", required=False),
})
CLOCK = ToolDefinition("current_time", "Returns the current local date, time and weekday")
# Non-ASCII text is written as characters, never as \u escapes, in both syntaxes.
METEO = ToolDefinition("météo", "Météo d'une ville, en °C", {"ville": ToolParam("str", "la ville, ex. Zürich ou 東京 (l'accent & <tout>)")})


@pytest.fixture(scope="module")
def oracle_dir() -> Path:
    target = CACHE / f"llama-models-{VERSION}"
    if (target / "llama_models" / "llama3" / "api" / "chat_format.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"llama-models=={VERSION}",
                            "-d", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot download llama-models {VERSION}: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(next(Path(tmp).glob("llama_models-*.whl"))) as wheel:
            unpacked = Path(tmp) / "unpacked"
            wheel.extractall(unpacked, [n for n in wheel.namelist() if n.startswith("llama_models/")])
        target.parent.mkdir(parents=True, exist_ok=True)
        unpacked.replace(target)
    return target


def ask_oracle(oracle_dir, requests) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "tests" / "llama_models_oracle.py"), str(oracle_dir)],
                       input=json.dumps(requests), capture_output=True, text=True, timeout=300)
    if "ModuleNotFoundError" in r.stderr:
        pytest.skip(f"llama-models needs a package this environment lacks: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tool_json(t: ToolDefinition) -> dict:
    params = {k: {"param_type": p.param_type, "description": p.description, "required": p.required}
              for k, p in t.parameters.items()}
    return {"name": t.name, "description": t.description, "parameters": params}


def undated(text: str) -> str:
    return re.sub(r"Today Date: .*", "Today Date: <today>", text)


@pytest.fixture(scope="module")
def fmt(llama3_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(llama3_tokenizer_path))


SYSTEM_CASES = [
    dict(builtin=["brave_search", "wolfram_alpha", "code_interpreter"], instruction=INSTRUCTION),
    dict(builtin=["code_interpreter"]),
    dict(builtin=[], instruction=INSTRUCTION),
    dict(builtin=["brave_search"], custom=[SONGS, CLOCK], instruction=INSTRUCTION, syntax="json"),
    dict(builtin=[], custom=[SONGS], instruction=INSTRUCTION, syntax="function_tag"),
    dict(builtin=[], custom=[METEO], instruction=INSTRUCTION, syntax="json"),
    dict(builtin=[], custom=[METEO], instruction=INSTRUCTION, syntax="function_tag"),
]


def test_system_prompts(oracle_dir):
    requests = [{**c, "custom": [tool_json(t) for t in c.get("custom", [])]} for c in SYSTEM_CASES]
    answers = ask_oracle(oracle_dir, {"system": requests})["system"]
    for case, messages in zip(SYSTEM_CASES, answers):
        ours = system_prompt(case["builtin"], case.get("custom", ()), case.get("instruction", ""), date.today(),
                             case.get("syntax", "json"))
        meta = messages[0]["content"]
        assert meta.endswith("\n")
        if case.get("custom"):  # Meta: definitions in a user message; ours: between the dates and the instruction
            assert messages[1]["role"] == "user"
            assert custom_tools_prompt(case["custom"], case["syntax"]) == messages[1]["content"]
            head = meta[: -len(f"\n\n{INSTRUCTION}\n")]
            meta = f"{head}\n\n{messages[1]['content']}\n\n{INSTRUCTION}\n"
        assert undated(ours) == undated(meta[:-1])


def test_tool_call_dialogs_encode_as_meta_encodes_them(fmt, oracle_dir):
    system = system_prompt(["brave_search", "wolfram_alpha"], instructions=INSTRUCTION, today=date(2024, 7, 23))
    calls = [
        ("wolfram_alpha", {"query": "100th decimal of pi"}),
        ("brave_search", {"query": "latest price of 1oz gold"}),
        ("code_interpreter", {"code": "def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))"}),
        ("trending_songs", {"n": "10", "genre": "all"}),  # custom, JSON syntax
    ]
    dialogs = [[
        {"role": "system", "content": system},
        {"role": "user", "content": "Use a tool, please."},
        {"role": "assistant", "content": "", "tool_calls": [ToolCall(name, args)], "stop_reason": "end_of_message"},
        {"role": "ipython", "content": '{"result": "7"}'},
        {"role": "assistant", "content": "The answer is 7.", "stop_reason": "end_of_turn"},
        {"role": "user", "content": "Thanks!"},
    ] for name, args in calls]
    meta = ask_oracle(oracle_dir, {"encode": [{"messages": as_json(d)} for d in dialogs]})["encode"]
    for dialog, theirs in zip(dialogs, meta):
        ours = fmt.encode_dialog_prompt(dialog)
        assert TAG in ours and 128008 in ours and theirs == ours


def test_function_tag_call_differs_only_by_the_tag(fmt, oracle_dir):
    call = ToolCall("get_weather", {"city": "Paris"}, syntax="function_tag")
    dialog = [{"role": "user", "content": "Weather?"},
              {"role": "assistant", "content": "", "tool_calls": [call], "stop_reason": "end_of_turn"},
              {"role": "user", "content": "ok"}]
    [theirs] = ask_oracle(oracle_dir, {"encode": [{"messages": as_json(dialog), "syntax": "function_tag"}]})["encode"]
    ours = fmt.encode_dialog_prompt(dialog)
    call_start = 1 + len(fmt.encode_message(dialog[0])) + len(fmt.encode_header("assistant"))
    assert theirs == ours[:call_start] + [TAG] + ours[call_start:]
    call_text = fmt.tokenizer.decode(ours[call_start:])
    assert call_text.startswith('<function=get_weather>{"city": "Paris"}</function><|eot_id|>')


def as_json(dialog):
    return [{**m, "tool_calls": [{"tool_name": c.tool_name, "arguments": c.arguments} for c in m.get("tool_calls", [])]}
            for m in dialog]


DECODE_CASES = [
    [TAG, 'brave_search.call(query="latest price of 1oz gold")'],
    [TAG, 'wolfram_alpha.call(query="100th decimal of pi")'],
    [TAG, 'photogen.call(query="a llama in Paris")'],
    [TAG, "import math\nprint(math.pi)"],
    [TAG, '{"type": "function", "name": "trending_songs", "parameters": {"n": "10"}}'],
    ['{"name": "get_weather", "parameters": {"city": "Paris"}}'],
    ['<function=trending_songs>{"n": 10}</function>'],
    ["The 100th decimal of pi is 7."],
    ['<function=trending_songs>{"n": 1'],
]


@pytest.mark.parametrize("reason", ["end_of_message", "end_of_turn"])
def test_decoding_agrees_with_meta(fmt, oracle_dir, reason):
    requests = []
    for parts in DECODE_CASES:
        tokens = []
        for part in parts:
            tokens += [part] if isinstance(part, int) else fmt.tokenizer.encode(part, bos=False, eos=False)
        requests.append({"tokens": tokens, "stop_reason": reason})
    meta = ask_oracle(oracle_dir, {"decode": requests})["decode"]
    for request, theirs in zip(requests, meta):
        ours = fmt.decode_assistant_message(request["tokens"], request["stop_reason"])
        calls = [{"tool_name": c.tool_name, "arguments": c.arguments} for c in ours["tool_calls"]]
        assert {"content": ours["content"], "stop_reason": ours["stop_reason"].value, "tool_calls": calls} == theirs
