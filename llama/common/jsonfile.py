"""Reading the small JSON files next to the weights (params.json, the BPE
tokenizer sidecar) with errors that name the file and the fix. No torch.

The files may come from anyone, so the cheap facts are checked before any
work that grows with what the file says: its size is capped, nesting that
would exhaust Python's stack is an error (not a RecursionError), and the
non-standard constants NaN / Infinity that Python's json accepts are refused.
The file is read through `userfiles.read_user_bytes`: a FIFO, a device or a
directory is refused by name, and no more than the cap is ever read.
"""

import json
from pathlib import Path
from typing import Type

from .userfiles import LIMITS, read_user_bytes

MAX_JSON_BYTES = LIMITS["json"]  # params.json is ~200 bytes, a sidecar a few KB


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_json_object(path: Path, missing: str, fix: str, error: Type[ValueError] = ValueError,
                     max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path`. FileNotFoundError says `missing`; a file that
    is not a JSON object (or is larger than `max_bytes`, or is not a regular
    file) raises `error` ending with `fix`."""
    raw = read_user_bytes(path, "json", fix=fix, missing=missing, error=error, max_bytes=max_bytes)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except RecursionError as e:
        raise error(f"{path} is not valid JSON (nested too deeply); {fix}") from e
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, NaN/Infinity, too many digits
        raise error(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data
