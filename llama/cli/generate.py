"""`llama chat` and `llama complete`: the model answers a prompt, or chats."""

import argparse
import sys
from pathlib import Path

from ..chat.session import ChatSession, from_rank0
from .run import BAD_INPUT, rank_and_world
from ..parallel.distributed import print_rank0
from .options import build_generator, check_prompt, read_stdin, sampling_kwargs


def write(text: str) -> None:
    print_rank0(text, end="", flush=True)


def note(text: str) -> None:
    """Remarks beside a one-shot answer go to stderr, so stdout holds the answer alone."""
    print_rank0(text, end="", flush=True, file=sys.stderr)


def _rank0() -> bool:
    """Rank 0 of the job, known before the process group exists (torchrun's RANK)."""
    return rank_and_world()[0] == 0


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", metavar="TEXT",
                   help="system prompt (with tools: the instructions after the tool definitions)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="answer this one message and exit (also: pipe the message into stdin)")


def chat(a: argparse.Namespace) -> None:
    # Rank 0 decides and reads (before loading, to fail early); the other ranks get its prompt once loaded.
    prompt = None
    if _rank0():
        prompt = check_prompt(a.prompt, "the message to answer, or leave --prompt out to chat")
        prompt = prompt if prompt is not None else read_stdin("a message on stdin, or --prompt")
    generator = build_generator(a)
    prompt = from_rank0(prompt)
    if prompt is None:  # stdin is a terminal: chat
        ChatSession(generator, write, system=a.system, **sampling_kwargs(a)).run()
        return
    session = ChatSession(generator, write, system=a.system, labels=False, note=note, **sampling_kwargs(a))
    if session.ask(prompt) is None:  # did not fit max_seq_len; the note said so
        sys.exit(BAD_INPUT)


def add_complete_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    source.add_argument("--file", type=Path, help="read the text to continue from this file")


def _completion_prompt(a: argparse.Namespace) -> str:
    if a.prompt is not None:
        return check_prompt(a.prompt, "the text to continue")
    if a.file is not None:
        if not a.file.is_file():
            raise FileNotFoundError(f"--file {a.file} not found")
        text = a.file.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--file {a.file} is empty: give a file with the text to continue")
        return text
    text = read_stdin("--prompt TEXT, --file FILE or text on stdin")
    if text is None:
        raise ValueError("nothing to complete: give --prompt TEXT, --file FILE, or pipe the text into stdin")
    return text


def complete(a: argparse.Namespace) -> None:
    """Streams the continuation of the prompt (the prompt itself is not repeated)."""
    prompt = _completion_prompt(a) if _rank0() else None
    generator = build_generator(a)
    prompt = from_rank0(prompt)
    tokens = generator.tokenizer.encode(prompt, bos=True, eos=False)
    sampling = sampling_kwargs(a)
    max_gen_len = sampling.pop("max_gen_len")
    if max_gen_len is None:
        max_gen_len = max(generator.model.params.max_seq_len - len(tokens), 1)
    stream = generator.generate_stream([tokens], max_gen_len, **sampling)
    try:
        for event in stream:
            write(event.text)
    finally:
        stream.close()
    write("\n")
