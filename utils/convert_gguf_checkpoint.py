"""Converts a Llama-architecture GGUF file (llama.cpp's format) into a Meta checkpoint directory.

    pip install gguf        # or: pip install -e ".[gguf]"
    python utils/convert_gguf_checkpoint.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out checkpoints/SmolLM2-135M-Instruct

Writes consolidated.00.pth, params.json, tokenizer.model (the byte-level BPE in tiktoken's
format), tokenizer.model.json (what that format cannot hold: split pattern,
special tokens, stop tokens, chat format) and checklist.chk. The directory then
works like any Meta checkpoint: pass it as --ckpt_dir and its tokenizer.model
as --tokenizer_path. Linear weights in Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K
keep their blocks (the checkpoint is about the GGUF's size; params.json says
so under "quantization"); embeddings, norms and float weights are float32
unless --dtype says otherwise. --dequantize expands every weight to --dtype.

Supported: general.architecture "llama" (dense; no RoPE scaling but Llama
3.1's, which llama.cpp stores as a rope_freqs tensor) with a GPT-2
style byte-level BPE tokenizer ("gpt2") whose pre-tokenizer is listed in
PRE_TOKENIZER_PATTERNS, and either Llama 3's vocabulary and chat format (then
tokenizer.model is a Meta Llama 3 tokenizer.model and there is no sidecar) or
a ChatML chat template; linear weights in a type kept quantized or a float
type (any type the gguf package can dequantize with --dequantize).
Anything else is refused with a message that says what. The output directory
is checked first; progress (tensors, MB, MB/s) goes to stderr. The whole
converted model is held in memory while it is written.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's llama package, installed or not

from llama.cli.checkpoints import add_convert_args, run_convert  # noqa: E402
from llama.cli.checkpoints import convert_gguf as convert  # noqa: E402,F401 - the name tests and benchmarks import
from llama.text.gguf_vocab import PRE_TOKENIZER_PATTERNS, tokenizer_files  # noqa: E402,F401
from llama.weights.gguf import (GLOBAL_TENSORS, LAYER_TENSORS, ROPE_FREQS, ConversionError,  # noqa: E402,F401
                                ffn_params, import_gguf)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_args(parser)
    a = parser.parse_args(argv)
    try:
        run_convert(a)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
