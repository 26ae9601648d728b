"""Fetches Meta's Llama 3 tokenizer.model from the `llama-models` wheel on PyPI.

    python utils/fetch_llama3_tokenizer.py --out checkpoints/llama3_tokenizer.model

The wheel is downloaded (not installed: it also carries a top-level package
named `models`), the file is extracted and checked against its known md5.
"""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llama-models==0.3.0"
MEMBER = "llama_models/llama3/tokenizer.model"
MD5 = "08292403f8b173e7524d7fba7bbbd2d3"


def fetch_llama3_tokenizer(out: Path) -> Path:
    """Returns `out`, downloading it first unless it is already there and intact."""
    out = Path(out)
    if out.is_file() and hashlib.md5(out.read_bytes()).hexdigest() == MD5:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("llama_models-*.whl"))
        data = zipfile.ZipFile(wheel).read(MEMBER)
    if hashlib.md5(data).hexdigest() != MD5:
        raise RuntimeError(f"{WHEEL} holds a {MEMBER} with an unexpected md5; not using it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write tokenizer.model")
    print(fetch_llama3_tokenizer(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
