#!/usr/bin/env python
"""Speculative decoding at batch 1 through the engine (no server): decode
tokens/s of plain and n-gram decoding on three chat tasks, interleaved in one
run (plain first, then each setting), so the adaptive pause
(llama/engine/speculative.py) can be tuned by measurement.

    python benchmarks/speculation.py [--ckpt_dir checkpoints/SmolLM2-135M-Instruct] [--dtype float32]
        [--settings 4:0.3,4:0.0] [--max_tokens 200]

Tasks: repeat a 200-token passage (input-grounded), summarise it, and write a
story (free chat). Settings are k:min_acceptance pairs; 0.0 never pauses.
"""

import argparse
import time
from pathlib import Path

from llama import Llama
from llama.engine.engine import Request
from llama.engine.sampling import SamplingParams
from llama.engine.speculative import Speculator
from llama.text.chat_format import ChatFormat

PASSAGE = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"


def decode_rate(engine, prompt, speculator, max_tokens):
    """(tokens/s after the first token, proposed, accepted) of one greedy request."""
    engine.set_speculation(speculator)
    engine.submit(Request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens)))
    first, done = None, None
    while engine.has_work():
        events = engine.step()
        if first is None and events:
            first = time.perf_counter()
        done = next((e.completion for e in events if e.completion is not None), done)
    engine.set_speculation(None)
    m = done.metrics
    return (len(done.tokens) - 1) / (time.perf_counter() - first), m.proposed_tokens, m.accepted_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", default="checkpoints/SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--settings", default="4:0.3,4:0.0", help="k:min_acceptance pairs, comma-separated")
    p.add_argument("--max_tokens", type=int, default=200)
    a = p.parse_args()
    g = Llama.build(a.ckpt_dir, str(Path(a.ckpt_dir) / "tokenizer.model"), max_seq_len=1024, max_batch_size=1,
                    dtype=a.dtype)
    fmt = ChatFormat.for_tokenizer(g.tokenizer)
    passage = g.tokenizer.decode(g.tokenizer.encode(PASSAGE.read_text(), bos=False, eos=False)[:200])
    tasks = {"repeat (grounded)": "Repeat the following passage word for word, and nothing else.\n\n" + passage,
             "summarise (grounded)": "Summarise this passage in three sentences.\n\n" + passage,
             "story (free chat)": "Write a short story about a llama who learns to sail."}
    settings = [(int(k), float(m)) for k, m in (s.split(":") for s in a.settings.split(","))]
    print(f"| task | plain tok/s | " + " | ".join(f"ngram k={k}, min {m}" for k, m in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for task, text in tasks.items():
        prompt = list(fmt.encode_dialog_prompt([{"role": "user", "content": text}]))
        plain = decode_rate(g.engine, prompt, None, a.max_tokens)[0]
        cells = []
        for k, m in settings:
            rate, proposed, accepted = decode_rate(g.engine, prompt, Speculator.ngram(k, min_acceptance=m),
                                                   a.max_tokens)
            cells.append(f"{rate / plain:.2f}x ({accepted}/{proposed} accepted)")
        print(f"| {task} | {plain:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
