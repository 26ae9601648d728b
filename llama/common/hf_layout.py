"""Meta's Hugging Face repositories keep the Meta-format files (params.json,
consolidated.NN.pth, tokenizer.model) in an `original/` folder, next to the
Hugging Face-format ones. A path into the repository's top level gets a hint
to use that folder instead. No torch here."""

from pathlib import Path


def original_folder_hint(directory) -> str:
    """" (...; pass --ckpt_dir DIR/original)" when `directory` is the top of
    such a download, else ""."""
    original = Path(directory) / "original"
    if not (original / "params.json").is_file():
        return ""
    return (f" ({directory} is a Hugging Face download: Meta's files are in {original}; pass "
            f"--ckpt_dir {original} --tokenizer_path {original / 'tokenizer.model'})")
