"""The `llama` command: one program for chatting, completing text and
handling checkpoints, with subcommands (`llama --help`, `llama chat --help`).

argparse (not fire, which the example scripts use) because it gives a
readable --help per subcommand with grouped flags and choices, mutually
exclusive inputs (--prompt / --file / stdin), and usage errors we can route
through the same one-message-per-job reporting as every other error.

Runs under torchrun like the examples:
    torchrun --nproc_per_node 2 -m llama chat --ckpt_dir DIR

Importing this module imports no torch: the console script imports it
before calling `main`, and the subcommands (which need torch, seconds to
import) are imported inside `main`, so that a Ctrl-C at any point, the
imports included, ends with one line and exit 130 (`run.interrupted`).
"""

import argparse
import sys
from typing import List, Optional

from .run import BAD_INPUT, interrupted, rank_and_world, report_error, run_clean, setup_logging


EXAMPLES = """examples:
  llama chat --ckpt_dir Meta-Llama-3.1-8B-Instruct --threads 1
  echo "Why is the sky blue?" | llama chat --ckpt_dir Meta-Llama-3.1-8B-Instruct --temperature 0
  llama complete --ckpt_dir llama-2-7b --prompt "The capital of France is" --max_gen_len 16
  llama serve --ckpt_dir Meta-Llama-3.1-8B-Instruct --max_batch_size 8 --port 8000
  llama info Meta-Llama-3.1-70B-Instruct
  llama shard -n 2 -i llama-2-7b-chat -o llama-2-7b-chat-2-workers
  llama convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out SmolLM2-q4      # the GGUF's 4-bit blocks kept
  llama quantize --ckpt_dir llama-2-7b --out llama-2-7b-int4 --quantize int4   # quantized once, loaded as is
"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors and --help are shown by rank 0 only: under torchrun every rank parses the same flags."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")

    def _print_message(self, message, file=None):
        if rank_and_world()[0] == 0:
            super()._print_message(message, file)


def build_parser() -> argparse.ArgumentParser:
    from .checkpoints import add_convert_args, add_info_args, add_shard_args, convert, info, shard
    from .generate import add_chat_args, add_complete_args, chat, complete
    from .options import add_model_args, add_sampling_args
    from .quantize import add_quantize_args, quantize
    from .serve import add_serve_args, serve

    parser = _Parser(prog="llama", description="Llama 2 / 3 / 3.1 inference on CPU and GPU.", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, help, **kw):
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    p = command("chat", chat, "chat with an instruct model (one answer with --prompt or text on stdin)")
    add_chat_args(p)
    add_model_args(p)
    add_sampling_args(p)
    p = command("complete", complete, "continue a text (--prompt, --file or stdin) with a pretrained model")
    add_complete_args(p)
    add_model_args(p)
    add_sampling_args(p)
    p = command("serve", serve, "serve the model over HTTP with OpenAI's API (/v1/chat/completions, "
                "/v1/completions); needs the server extra")
    add_serve_args(p)
    add_model_args(p, max_batch_size=8)
    add_info_args(command("info", info, "what a checkpoint directory holds, without loading it"))
    add_shard_args(command("shard", shard, "split or merge a checkpoint into N shards (one per worker)"))
    add_convert_args(command("convert", convert, "convert a GGUF file (llama.cpp's format) into a checkpoint directory"))
    add_quantize_args(command("quantize", quantize, "store a checkpoint's linear weights quantized (int8 or int4), "
                              "once: later starts load them as they are"))
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    try:
        setup_logging()
        argv = sys.argv[1:] if argv is None else list(argv)
        try:
            args = build_parser().parse_args(argv)
        except UsageError as e:
            report_error(str(e))
            sys.exit(BAD_INPUT)
        run_clean(args.func, args)
    except KeyboardInterrupt:  # while torch imports, or anywhere run_clean does not cover
        interrupted()
