"""Meta's llama-models chat format as a test oracle, run in its own process.

    python tests/llama_models_oracle.py PACKAGE_DIR < requests.json > answers.json

PACKAGE_DIR holds the `llama_models` package unpacked from its wheel (never
installed: the wheel also carries a top-level package named `models`).
Requests and answers are JSON:

    {"system": [{"builtin": [...], "custom": [tool], "instruction": str, "syntax": "json"|"function_tag"}],
     "encode": [{"messages": [message], "syntax": "json"|"function_tag"}],
     "decode": [{"tokens": [...], "stop_reason": str}]}

with tool = {"name", "description", "parameters": {name: {"param_type", "description", "required"}}}
and message = {"role", "content", "tool_calls": [{"tool_name", "arguments"}], "stop_reason"}.
"""

import json
import sys
import types

sys.path.insert(0, sys.argv[1])
try:
    import PIL  # noqa: F401
except ImportError:  # only images need Pillow; give the type annotations something to name
    sys.modules["PIL"] = types.SimpleNamespace(Image=types.SimpleNamespace(Image=object))

from llama_models.llama3.api.chat_format import ChatFormat  # noqa: E402
from llama_models.llama3.api.datatypes import (  # noqa: E402
    BuiltinTool, RawMessage, StopReason, ToolCall, ToolDefinition, ToolParamDefinition, ToolPromptFormat,
)
from llama_models.llama3.api.interface import LLama31Interface  # noqa: E402
from llama_models.llama3.api.tokenizer import Tokenizer  # noqa: E402


def system(request):
    interface = LLama31Interface(ToolPromptFormat(request.get("syntax", "json")))
    builtin = [ToolDefinition(tool_name=BuiltinTool(name)) for name in request.get("builtin", [])]
    custom = [
        ToolDefinition(tool_name=t["name"], description=t["description"],
                       parameters={k: ToolParamDefinition(**p) for k, p in t["parameters"].items()})
        for t in request.get("custom", [])
    ]
    messages = interface.system_messages(builtin, custom, request.get("instruction"))
    return [{"role": m.role, "content": m.content} for m in messages]


def raw_message(m):
    calls = [ToolCall(call_id=str(i), tool_name=c["tool_name"], arguments=c["arguments"])
             for i, c in enumerate(m.get("tool_calls", []))]
    role = "tool" if m["role"] == "ipython" else m["role"]
    reason = StopReason(m["stop_reason"]) if m.get("stop_reason") else None
    return RawMessage(role=role, content=m["content"], tool_calls=calls, stop_reason=reason)


def decoded(message):
    return {
        "content": message.content,
        "stop_reason": message.stop_reason.value,
        "tool_calls": [{"tool_name": getattr(c.tool_name, "value", c.tool_name), "arguments": c.arguments}
                       for c in message.tool_calls],
    }


def main():
    requests = json.load(sys.stdin)
    formatter = ChatFormat(Tokenizer.get_instance())
    answers = {
        "system": [system(r) for r in requests.get("system", [])],
        "encode": [formatter.encode_dialog_prompt([raw_message(m) for m in r["messages"]],
                                                  ToolPromptFormat(r.get("syntax", "json"))).tokens
                   for r in requests.get("encode", [])],
        "decode": [decoded(formatter.decode_assistant_message(r["tokens"], StopReason(r["stop_reason"])))
                   for r in requests.get("decode", [])],
    }
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
