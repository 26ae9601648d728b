"""The requests the server accepts, as pydantic models of OpenAI's API
reference (the fields we implement; `APIError` for the rest), and OpenAI's
error JSON.

Strict types: a string where a number belongs is an error, as with OpenAI,
not silently converted. Unknown fields are errors too (a misspelt
`max_tokens` should not be ignored), except a few that only carry bookkeeping.

Bounded work: what a client sends is bounded before anything is built from
it. A completion prompt list longer than `MAX_CHOICES`, or a token list
longer than `MAX_PROMPT_TOKENS`, is refused by a "before" validator that
only reads lengths (pydantic would otherwise convert every element of a
1.5-million-entry list first); a tool's `parameters` must be a JSON schema of
an object, nested at most `MAX_JSON_DEPTH` deep. These errors are
`PydanticCustomError`s whose message names the limit (guard.py turns them
into a 400 naming the field).
"""

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# Engine requests one HTTP request may make (prompts x n), whatever the server's capacity.
MAX_CHOICES = 128
# Tokens in one token-id prompt: Llama 3.1's context; the model's own max_seq_len is checked later.
MAX_PROMPT_TOKENS = 1 << 17
# Nesting of a tool's parameters schema and of a tool call's arguments.
MAX_JSON_DEPTH = 32

# The error types of the checks above: guard.validation_message prints their message without the input.
LIMIT_ERRORS = ("too_many_prompts", "prompt_too_long", "tool_schema")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Model):
    type: Literal["text"]
    text: str


Content = Union[str, List[TextPart], None]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None


def json_depth(value, limit: int) -> int:
    """How deep `value` (parsed JSON) nests, counting stops once it passes
    `limit` (returns limit + 1); iterative, so no depth can overflow the stack."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return limit + 1
            deepest = max(deepest, d)
            todo += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def _schema_problem(schema: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a tool's `parameters` (None if nothing): a JSON schema
    of an object whose properties each have a type, as Llama 3.1's tool prompt needs."""
    if json_depth(schema, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return f"nests deeper than {MAX_JSON_DEPTH} levels"
    if schema.get("type", "object") != "object":
        return f"type must be \"object\" (got {str(schema.get('type'))[:40]!r})"
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        return f"properties must be an object mapping names to schemas (got {type(props).__name__})"
    for name, p in props.items():
        if not isinstance(p, dict):
            return f"properties.{name} must be an object (a JSON schema), got {type(p).__name__}"
        t = p.get("type", "string")
        if not (isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(x, str) for x in t))):
            return f"properties.{name}.type must be a string or a list of strings, got {str(t)[:40]!r}"
        if not isinstance(p.get("description", ""), str):
            return f"properties.{name}.description must be a string"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return f"required must be a list of property names, got {str(required)[:40]!r}"
    unknown = [r for r in required if r not in props]
    if unknown:
        return f"required names {unknown[0]!r}, which is not in properties"
    return None


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str = ""
    parameters: Dict[str, Any] = Field(default_factory=dict)  # a JSON schema
    strict: Optional[bool] = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, schema: Dict[str, Any]) -> Dict[str, Any]:
        problem = _schema_problem(schema)
        if problem:
            raise PydanticCustomError("tool_schema", "not a usable JSON schema of the arguments: {problem}",
                                      {"problem": problem})
        return schema


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class ToolChoiceFunction(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


class ResponseFormat(_Model):
    type: Literal["text"]


class _Sampling(_Model):
    """Fields both endpoints share. Values are range-checked by SamplingParams;
    None means "not given": `translate.sampling_params` applies OpenAI's defaults."""

    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = Field(None, ge=1, le=16)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None  # bookkeeping only


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceFunction, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    metadata: Optional[Dict[str, str]] = None
    store: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded(cls, prompt):
        """Reads lengths only, before pydantic converts the elements: a huge list costs nothing."""
        if not isinstance(prompt, list):
            return prompt
        if prompt and isinstance(prompt[0], list):
            if len(prompt) > MAX_CHOICES:
                raise PydanticCustomError("too_many_prompts", "{count} prompts; at most {limit} per request",
                                          {"count": len(prompt), "limit": MAX_CHOICES})
            long = next((k for k, p in enumerate(prompt) if isinstance(p, list) and len(p) > MAX_PROMPT_TOKENS), None)
            if long is not None:
                raise PydanticCustomError("prompt_too_long", "prompt {k} has {count} tokens; at most {limit}",
                                          {"k": long, "count": len(prompt[long]), "limit": MAX_PROMPT_TOKENS})
        elif prompt and isinstance(prompt[0], str):
            if len(prompt) > MAX_CHOICES:
                raise PydanticCustomError("too_many_prompts", "{count} prompts; at most {limit} per request",
                                          {"count": len(prompt), "limit": MAX_CHOICES})
        elif len(prompt) > MAX_PROMPT_TOKENS:
            raise PydanticCustomError("prompt_too_long", "the prompt has {count} tokens; at most {limit}",
                                      {"count": len(prompt), "limit": MAX_PROMPT_TOKENS})
        return prompt

    def prompt_count(self) -> int:
        """How many prompts (a string or one token list is one)."""
        p = self.prompt
        return 1 if isinstance(p, str) or not p or isinstance(p[0], int) else len(p)
