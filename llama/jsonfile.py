"""Reading the small JSON files next to the weights (params.json, the BPE
tokenizer sidecar) with errors that name the file and the fix. No torch."""

import json
from pathlib import Path
from typing import Type


def read_json_object(path: Path, missing: str, fix: str, error: Type[ValueError] = ValueError) -> dict:
    """The JSON object in `path`. FileNotFoundError says `missing`; a file that
    is not a JSON object raises `error` ending with `fix`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data
