"""OpenAI's chat messages, tools and sampling fields to ours, and answers back.

`sampling_params` is the one place OpenAI's sampling fields and their
defaults (`OPENAI_DEFAULTS`: temperature 1, top_p 1, n 1, 16 tokens for a
text completion, ...) become our `SamplingParams`, one per choice. They are
OpenAI's, not the command line's (Meta's 0.6 / 0.9): a client written for
OpenAI gets what it expects.

OpenAI role "tool" is Llama 3.1's "ipython" (a tool result); "developer" is a
system message. Tools are offered as Llama 3.1 custom tools: their
definitions go into the system prompt (`llama.text.tool_calls.system_prompt`),
before the client's own system message, and the calls the model writes come
back as OpenAI `tool_calls` with `finish_reason` "tool_calls".
"""

import json
from typing import List, Tuple, Union

from ..text.messages import StopReason
from ..engine.sampling import SamplingParams
from ..text.tool_calls import CallSyntax, ToolCall, ToolDefinition, ToolParam, system_prompt
from .protocol import MAX_CHOICES, MAX_JSON_DEPTH, APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, \
    Content, json_depth

# What OpenAI's API reference gives a field the client leaves out (or sends as
# null). max_tokens: a chat answer runs until the context is full; a text
# completion stops at 16 tokens unless the client sends a number or null.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "stop": (), "chat_max_tokens": None, "completion_max_tokens": 16}


def text_of(content: Content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _tool_call(i: int, j: int, call) -> ToolCall:
    where = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise APIError(400, f"{where} is not JSON: {e}", where) from None
    except RecursionError:  # json's C parser gives up near the interpreter's recursion limit
        raise APIError(400, f"{where} nests deeper than {MAX_JSON_DEPTH} levels", where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where} must be a JSON object", where)
    if json_depth(arguments, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise APIError(400, f"{where} nests deeper than {MAX_JSON_DEPTH} levels", where)
    return ToolCall(call.function.name, arguments, call_id=call.id, syntax=CallSyntax.JSON)


def _message(i: int, m: ChatMessage) -> dict:
    role = {"developer": "system", "tool": "ipython"}.get(m.role, m.role)
    out = {"role": role, "content": text_of(m.content)}
    if m.tool_calls:
        if m.role != "assistant":
            raise APIError(400, f"messages[{i}] ({m.role}) has tool_calls; only assistant messages make tool calls",
                           f"messages[{i}].tool_calls")
        out["tool_calls"] = [_tool_call(i, j, c) for j, c in enumerate(m.tool_calls)]
        out["stop_reason"] = StopReason.END_OF_MESSAGE
    return out


def _definition(tool) -> ToolDefinition:
    """Llama 3.1's tool definition; `protocol.FunctionDef` checked the schema's shape."""
    schema = tool.function.parameters or {}
    props = schema.get("properties") or {}
    required = set(schema.get("required") or ())

    def type_of(p):
        t = p.get("type", "string")
        return t if isinstance(t, str) else " | ".join(t)
    params = {name: ToolParam(type_of(p), p.get("description", ""), name in required) for name, p in props.items()}
    return ToolDefinition(tool.function.name, tool.function.description, params)


def tools_offered(req: ChatCompletionRequest) -> list:
    """The tools the model is told about: none for tool_choice "none", one for a named function."""
    tools = req.tools or []
    if req.tool_choice == "none":
        return []
    if req.tool_choice is not None and not isinstance(req.tool_choice, str):
        name = req.tool_choice.function.name
        tools = [t for t in tools if t.function.name == name]
        if not tools:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
    elif req.tool_choice in ("auto", "required") and not tools:
        raise APIError(400, f"tool_choice {req.tool_choice!r} needs tools", "tool_choice")
    return tools


def dialog_of(req: ChatCompletionRequest, formatter) -> list:
    """The dialog to encode; with tools, the Llama 3.1 tool system prompt comes first."""
    dialog = [_message(i, m) for i, m in enumerate(req.messages)]
    tools = tools_offered(req)
    if tools:
        if type(formatter).__name__ != "Llama3ChatFormat":
            raise APIError(400, "tools need a Llama 3.1 model (its chat format carries tool calls)", "tools")
        instructions = dialog.pop(0)["content"] if dialog and dialog[0]["role"] == "system" else ""
        if req.tool_choice == "required" or not isinstance(req.tool_choice, (str, type(None))):
            instructions = (instructions + "\n\nAnswer with a function call.").strip()
        prompt = system_prompt(custom_tools=[_definition(t) for t in tools], instructions=instructions)
        dialog.insert(0, {"role": "system", "content": prompt})
    return dialog


def sampling_params(req: Union[ChatCompletionRequest, CompletionRequest]) -> List[SamplingParams]:
    """The SamplingParams of each of the request's n choices; a bad value is a
    400 naming the field.

    Choice i has seed `seed + i` (without a seed each draws its own), so n=2
    with seed s answers what two requests with seeds s and s+1 would. A chat
    request's max_completion_tokens wins over its (deprecated) max_tokens."""
    d = OPENAI_DEFAULTS
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs, top_logprobs = req.logprobs, req.top_logprobs or 0
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = d["chat_max_tokens"]
    else:
        logprobs, top_logprobs = req.logprobs is not None, req.logprobs or 0
        # An explicit null keeps its meaning (until the context is full); only a missing field is 16.
        max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else d["completion_max_tokens"]
    n = d["n"] if req.n is None else req.n
    seeds = [None] * n if req.seed is None else [req.seed + i for i in range(n)]

    def given(name):
        value = getattr(req, name)
        return d[name] if value is None else value
    try:
        return [SamplingParams(temperature=given("temperature"), top_p=given("top_p"),
                               presence_penalty=given("presence_penalty"),
                               frequency_penalty=given("frequency_penalty"), stop=given("stop"),
                               seed=seed, max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top_logprobs)
                for seed in seeds]
    except ValueError as e:
        field = str(e).split()[1] if str(e).startswith("sampling ") else None
        raise APIError(400, str(e), field) from None


def check_size(req: Union[ChatCompletionRequest, CompletionRequest], prompts: int, capacity: int) -> None:
    """400 naming the field if the request's prompts x n engine requests exceed
    MAX_CHOICES or the server's `capacity` (running rows plus queue places):
    such a request could never be admitted, and a 429 would make clients retry
    it forever. Only a queue that is full right now is a 429 (serving.Submission)."""
    n = OPENAI_DEFAULTS["n"] if req.n is None else req.n
    param = "n" if n > 1 or prompts == 1 else "prompt"
    what = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
    if prompts * n > MAX_CHOICES:
        raise APIError(400, f"{what} is {prompts * n} answers; at most {MAX_CHOICES} per request", param)
    if prompts * n > capacity:
        raise APIError(400, f"{what} is {prompts * n} answers, more than this server can hold at once "
                            f"({capacity}: running rows plus queue places); send fewer per request", param)


def finish_reason(reason: StopReason, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_calls"
    return "length" if reason == StopReason.OUT_OF_TOKENS else "stop"


def openai_tool_calls(calls: List[ToolCall]) -> List[dict]:
    return [{"id": f"call_{c.call_id}", "type": "function",
             "function": {"name": c.tool_name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
            for c in calls]


def answer(completion, formatter, tools_on: bool) -> Tuple[str, List[dict]]:
    """(content, OpenAI tool_calls) of a finished chat request. Without tools
    the answer is the streamed text as it is (the client offered no tools)."""
    if not tools_on:
        return completion.text, []
    message = formatter.decode_assistant_message(completion.tokens, completion.stop_reason)
    return message["content"], openai_tool_calls(message["tool_calls"])
