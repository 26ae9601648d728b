"""A dialog saved as JSON and read back (the chat's `/save` and `/load`). No torch.

The file is the dialog as the API takes it: a list of {"role", "content"}
messages; assistant messages may also have "tool_calls" (ToolCall fields) and
"stop_reason" (its value, e.g. "end_of_turn"), so that a dialog read back
encodes to the very tokens it had when saved.

A file given to /load may come from anyone, so `load_dialog` checks it all
before the chat sees any of it, and every problem is one `DialogFileError`
(a ValueError) naming the file, the message and what is wrong, never
another exception: the file is read through `read_user_bytes` (a regular
file of at most 16 MiB, see LIMITS["dialog"]), nesting past Python's stack
and NaN / Infinity are refused, a dialog of more than MAX_MESSAGES messages
is refused before any message is built, and every field of every message
and tool call has the type the chat format expects (tool-call arguments
nested at most MAX_ARGUMENT_DEPTH deep, so rendering them cannot exhaust
the stack either). Whether roles follow each other as a chat format wants
is that format's check.
"""

import dataclasses
import gc
import json
import os
import tempfile
from pathlib import Path
from typing import List

from ..common.userfiles import read_user_bytes
from ..text.chat_format import Message, StopReason
from ..text.messages import DialogError
from ..text.tool_calls import CallSyntax, ToolCall

_CALL_FIELDS = {f.name for f in dataclasses.fields(ToolCall)}

# Every message costs at least 4 tokens in every chat format (Llama 3:
# <|start_header_id|> role <|end_header_id|> "\n\n" ... <|eot_id|>; Llama 2's
# [INST] [/INST] and ChatML's <|im_start|> role "\n" ... <|im_end|> likewise), and
# no Llama has a context past 131,072 tokens, so a dialog of more messages can
# never be sent to a model.
MAX_MESSAGES = 131_072 // 4
# Tool-call arguments deeper than this are no call a model writes; the bound
# keeps json.dumps (which renders them) far from Python's recursion limit.
MAX_ARGUMENT_DEPTH = 32
_FIX = "give a file written by /save, or fix the file"


class DialogFileError(DialogError):
    """A dialog file that cannot be read back: the message names the file and the problem."""


def _to_json(message: Message) -> dict:
    out = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(call).items()}
            for call in message["tool_calls"]
        ]
    if "stop_reason" in message:
        out["stop_reason"] = StopReason(message["stop_reason"]).value
    return out


def save_dialog(dialog: List[Message], path) -> Path:
    """Writes `dialog` to `path` as JSON, atomically (a temporary file in the same directory, then renamed)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    text = json.dumps([_to_json(m) for m in dialog], indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _depth(value) -> int:
    """How many levels of lists and objects hold values in `value` (0 for a
    scalar or an empty one), counted without recursion and only to
    MAX_ARGUMENT_DEPTH + 1."""
    depth, level = 0, [value]
    while depth <= MAX_ARGUMENT_DEPTH:
        level = [v for x in level if isinstance(x, (list, dict)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            break
        depth += 1
    return depth


def _call_from_json(i: int, j: int, c) -> ToolCall:
    where = f"message {i}, tool call {j}"
    if not isinstance(c, dict):
        raise ValueError(f"{where} must be an object, got {type(c).__name__}")
    if not isinstance(c.get("tool_name"), str) or not c["tool_name"]:
        raise ValueError(f"{where}: 'tool_name' must be a non-empty string, got {c.get('tool_name')!r:.60}")
    if not isinstance(c.get("arguments"), dict):
        raise ValueError(f"{where}: 'arguments' must be an object, got {c.get('arguments')!r:.60}")
    if _depth(c["arguments"]) > MAX_ARGUMENT_DEPTH:
        raise ValueError(f"{where}: 'arguments' nest more than {MAX_ARGUMENT_DEPTH} levels deep")
    for key in ("call_id", "text"):
        if key in c and not isinstance(c[key], str) and not (key == "text" and c[key] is None):
            raise ValueError(f"{where}: {key!r} must be a string{' or null' if key == 'text' else ''}, "
                             f"got {c[key]!r:.60}")
    syntaxes = [s.value for s in CallSyntax]
    if c.get("syntax") is not None and c["syntax"] not in syntaxes:
        raise ValueError(f"{where}: 'syntax' {c['syntax']!r:.60} is not one of {syntaxes}")
    call = ToolCall(**{k: v for k, v in c.items() if k in _CALL_FIELDS})
    try:
        call.render()
    except ValueError as e:
        raise ValueError(f"{where} cannot be written back ({e})") from None
    return call


def _from_json(i: int, item) -> Message:
    if not isinstance(item, dict) or not isinstance(item.get("role"), str) or not isinstance(item.get("content"), str):
        raise ValueError(f"message {i} must be an object with string 'role' and 'content', got {item!r:.80}")
    message: Message = {"role": item["role"], "content": item["content"]}
    calls = item.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list of objects with a 'tool_name', got {calls!r:.60}")
    if calls:
        message["tool_calls"] = [_call_from_json(i, j, c) for j, c in enumerate(calls)]
    if "stop_reason" in item:
        if not isinstance(item["stop_reason"], str) or item["stop_reason"] not in [r.value for r in StopReason]:
            raise ValueError(f"message {i}: unknown stop_reason {item['stop_reason']!r:.60}; "
                             f"one of {[r.value for r in StopReason]}")
        message["stop_reason"] = StopReason(item["stop_reason"])
    return message


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_dialog(path) -> List[Message]:
    """Reads a dialog written by `save_dialog` (or by hand). Raises
    FileNotFoundError for a missing file and DialogFileError (naming the file
    and the problem) for anything else wrong with it; see the module docstring.
    Whether the messages fit a model's chat format is for that format to check."""
    path = Path(path)
    raw = read_user_bytes(path, "dialog", fix=_FIX, error=DialogFileError)
    # The cyclic garbage collector would run again and again over the millions
    # of lists a hostile file of the cap's size holds (7 times the parse's own
    # time); JSON cannot make cycles, so it is paused while parsing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise DialogFileError(f"{path} is not valid JSON (nested too deeply); {_FIX}") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, NaN / Infinity
        raise DialogFileError(f"{path} is not valid JSON ({str(e)[:200]}); {_FIX}") from None
    finally:
        if collecting:
            gc.enable()
    if not isinstance(data, list):
        raise DialogFileError(f"{path} must hold a JSON list of messages, got {type(data).__name__}")
    if len(data) > MAX_MESSAGES:
        raise DialogFileError(
            f"{path} holds {len(data):,} messages; no model's context (at most 131,072 tokens, 4 or more per "
            f"message) holds more than {MAX_MESSAGES:,}: keep only the part of the conversation you need")
    try:
        return [_from_json(i, item) for i, item in enumerate(data)]
    except ValueError as e:
        raise DialogFileError(f"{path}: {e}") from None
