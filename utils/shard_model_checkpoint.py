"""Splits (or merges) a Meta checkpoint into N shards, one per worker.

    python utils/shard_model_checkpoint.py -n 2 -i llama-2-7b-chat/ -o llama-2-7b-chat-2-workers/

Writes consolidated.00.pth .. consolidated.NN.pth, params.json, tokenizer.model
(from the input directory, or --tokenizer) and checklist.chk. Works one output
shard at a time from memory-mapped inputs: peak memory is about one output
shard, so a model bigger than this machine's RAM can be split. Files appear
under their final names only once all are complete. Progress (shards, MB
written, MB/s) goes to stderr.

Not needed to run a checkpoint on a different number of workers (Llama.build
reshards on the fly), but then every worker reads the original files; with
pre-split shards each worker only needs its own file.

With --pipeline_stages P it writes one folder per pipeline stage, stage0/ ..
stage{P-1}/, each holding -n shards of only that stage's layers (the first
stage also the embedding, the last the output), params.json, the tokenizer
and pipeline.json (which layers). Copy to each node the folders of its
stages, under the same --ckpt_dir:

    python utils/shard_model_checkpoint.py --pipeline_stages 2 -n 1 -i Meta-Llama-3-8B/ -o llama3-8b-2-stages/
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's llama package, installed or not

from llama.cli.checkpoints import add_shard_args  # noqa: E402
from llama.weights.writer import reshard_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard_args(parser)
    a = parser.parse_args(argv)
    try:
        reshard_checkpoint(a.input, a.output, a.num_shards, tokenizer_path=a.tokenizer, force=a.force,
                           show_progress=True, pipeline_stages=a.pipeline_stages)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
