"""A dialog saved as JSON and read back (the chat's `/save` and `/load`). No torch.

The file is the dialog as the API takes it: a list of {"role", "content"}
messages; assistant messages may also have "tool_calls" (ToolCall fields) and
"stop_reason" (its value, e.g. "end_of_turn"), so that a dialog read back
encodes to the very tokens it had when saved.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import List

from ..text.chat_format import Message, StopReason
from ..text.tool_calls import ToolCall

_CALL_FIELDS = {f.name for f in dataclasses.fields(ToolCall)}


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


def _from_json(i: int, item) -> Message:
    if not isinstance(item, dict) or not isinstance(item.get("role"), str) or not isinstance(item.get("content"), str):
        raise ValueError(f"message {i} must be an object with string 'role' and 'content', got {item!r:.80}")
    message: Message = {"role": item["role"], "content": item["content"]}
    calls = item.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and "tool_name" in c for c in calls):
            raise ValueError(f"message {i}: tool_calls must be a list of objects with a 'tool_name'")
        try:
            message["tool_calls"] = [ToolCall(**{k: v for k, v in c.items() if k in _CALL_FIELDS}) for c in calls]
        except (TypeError, ValueError) as e:
            raise ValueError(f"message {i}: a tool call cannot be read back ({e})") from None
    if "stop_reason" in item:
        try:
            message["stop_reason"] = StopReason(item["stop_reason"])
        except ValueError:
            raise ValueError(f"message {i}: unknown stop_reason {item['stop_reason']!r}; "
                             f"one of {[r.value for r in StopReason]}") from None
    return message


def load_dialog(path) -> List[Message]:
    """Reads a dialog written by `save_dialog` (or by hand); errors name the file and the problem.
    Whether the messages fit a model's chat format is for that format to check."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of messages, got {type(data).__name__}")
    try:
        return [_from_json(i, item) for i, item in enumerate(data)]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
