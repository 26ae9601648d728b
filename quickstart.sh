#!/usr/bin/env bash
# Quick start: from a fresh clone to a streamed chat answer on the CPU.
#
#   bash quickstart.sh            # then: .venv/bin/python -m pytest
#
# Creates .venv, installs PyTorch and this
# package with its test tools, writes a small random-weight Llama 3 checkpoint
# with Meta's real Llama 3 tokenizer, and runs the chat example on it.
# Set TORCH_SPEC to choose the PyTorch build (e.g. a CUDA one).
set -euo pipefail
cd "$(dirname "$0")"

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "$TORCH_SPEC"
python -m pip install --quiet -e ".[test]"

ckpt=checkpoints/random-llama3
python utils/fetch_llama3_tokenizer.py --out checkpoints/llama3_tokenizer.model
if [ ! -f "$ckpt/checklist.chk" ]; then
    python utils/make_random_checkpoint.py --out "$ckpt" --family llama3.1 \
        --tokenizer checkpoints/llama3_tokenizer.model --dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 2 --force
fi
python example_chat_completion.py --ckpt_dir "$ckpt" --tokenizer_path "$ckpt/tokenizer.model" \
    --device cpu --max_seq_len 512 --max_gen_len 32 --max_batch_size 2
