"""The names of the files a checkpoint folder holds, in one place for every
reader and writer. No torch."""

from pathlib import Path


def shard_name(i: int) -> str:
    """Meta's name for model-parallel shard `i`: consolidated.00.pth, ..."""
    return f"consolidated.{i:02d}.pth"


def sidecar_path(path) -> Path:
    """Where a BPE tokenizer keeps what its ranks file cannot say (split
    pattern, special tokens, chat format): `tokenizer.model` -> `tokenizer.model.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")
