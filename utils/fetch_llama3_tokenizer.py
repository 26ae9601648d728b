"""Fetches Meta's Llama 3 tokenizer.model from the `llama-models` wheel on PyPI.

    python utils/fetch_llama3_tokenizer.py --out checkpoints/llama3_tokenizer.model

The wheel is downloaded, not installed (it also carries a top-level package
named `models`); the file (2,183,982 bytes, md5 08292403f8b173e7524d7fba7bbbd2d3)
is extracted and checked against its sha256.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from utils.wheel_files import fetch_wheel_member  # noqa: E402

WHEEL = "llama-models==0.3.0"
MEMBER = "llama_models/llama3/tokenizer.model"
SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def fetch_llama3_tokenizer(out: Path) -> Path:
    """Returns `out`, downloading it first unless it is already there and intact."""
    return fetch_wheel_member(WHEEL, MEMBER, SHA256, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write tokenizer.model")
    print(fetch_llama3_tokenizer(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
