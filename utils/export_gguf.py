"""Writes a Meta checkpoint as a float32 GGUF file that llama.cpp runs: the
same weights for both engines in a side-by-side benchmark.

    pip install gguf        # or: pip install -e ".[gguf]"
    python utils/export_gguf.py --ckpt_dir checkpoints/SmolLM2-135M-Instruct \\
        --tokenizer_from checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-f32.gguf

The inverse of utils/convert_gguf_checkpoint.py: exporting a converted
checkpoint and converting the result back gives the same tensors bit for bit.
The model's shape comes from params.json, the weights from the checkpoint
(one shard; merge others first with utils/shard_model_checkpoint.py -n 1).
The tokenizer is not rebuilt from tokenizer.model: every `tokenizer.*` key
(vocabulary, merges, pre-tokenizer, special ids, chat template) and the
descriptive `general.*` keys are copied from a GGUF file of the same
vocabulary (--tokenizer_from), so llama.cpp tokenizes as that file does.

No rows are reordered: Meta's wq/wk rotate interleaved pairs, and so does
llama.cpp's LLaMA RoPE (its own converter permutes Hugging Face's half-split
rows back to this layout), which is why the importer copies them as they are.
Tied embeddings (output equal to tok_embeddings) are written once, as
llama.cpp's files hold them; Llama 3.1's RoPE scaling becomes a rope_freqs
tensor. bf16 or quantized files are llama.cpp's to make from this one
(llama-quantize, or llama_cpp.llama_model_quantize).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's llama package, installed or not

from llama.weights.gguf_export import ExportError, export_gguf, gguf_name  # noqa: E402,F401 - names callers import


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, type=Path, help="Meta checkpoint directory (one shard)")
    parser.add_argument("--tokenizer_from", required=True, type=Path,
                        help="a GGUF file with this model's vocabulary (its tokenizer keys are copied)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    parser.add_argument("--context_length", type=int, help="llama.context_length (default: the template's)")
    a = parser.parse_args(argv)
    try:
        out = export_gguf(a.ckpt_dir, a.out, a.tokenizer_from, a.context_length)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, float32)")


if __name__ == "__main__":
    main()
