"""Driving the engine step by step and loading pipeline stages by hand, shared by the
engine, pipeline and compiled-decoding tests."""

import torch


def drive(engine, plan, cancel=None, after_step=None, max_steps=500):
    """Steps `engine` until it has no work: `plan` maps a step number to the
    requests submitted before it, `cancel` (step, index) cancels the index-th
    request submitted before that step, `after_step(engine)` runs after each
    step. Returns ({index: [tokens]}, {index: last event}, [{index: tokens
    that step}] per step), indexed in submission order; events of requests
    submitted elsewhere are skipped."""
    ids, tokens, last, steps = [], {}, {}, []
    for step in range(max_steps):
        for request in plan.get(step, []):
            ids.append(engine.submit(request))
        if cancel is not None and cancel[0] == step:
            engine.cancel(ids[cancel[1]])
        if not engine.has_work() and step > max(plan):
            break
        this = {}
        for e in engine.step():
            if e.row not in ids:
                continue
            i = ids.index(e.row)
            if e.token is not None:
                tokens.setdefault(i, []).append(e.token)
                this[i] = this.get(i, 0) + 1
            if e.stop_reason is not None:
                last[i] = e
        steps.append(this)
        if after_step is not None:
            after_step(engine)
    return tokens, last, steps


def run_to_end(engine, schedule, max_steps=200):
    """drive's answers as lists in submission order: ([tokens], [last event])."""
    tokens, last, _ = drive(engine, schedule, max_steps=max_steps)
    submitted = range(sum(len(requests) for requests in schedule.values()))
    return [tokens.get(i, []) for i in submitted], [last[i] for i in submitted]


def encode(gen, texts):
    return [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]


PROMPTS = ["A llama", "The transformer has an embedding table and a stack of layers", "Hi", "Model parallelism"]


FOUR_LAYERS = {"n_layers": 4}


def stage_args(ckpt):
    """params.json's ModelArgs, a vocab_size of -1 taken from the (whole)
    checkpoint's weights, as the stage splitter and the loader resolve it (llama/weights/stages.py stage_layers)."""
    import dataclasses

    from llama.weights.args import ModelArgs
    from llama.weights.checkpoint import find_shards, weights_vocab_size
    from llama.weights.stages import model_folder

    folder = model_folder(ckpt)
    args = ModelArgs.from_json(folder / "params.json")
    if args.vocab_size > 0:
        return args
    return dataclasses.replace(args, vocab_size=weights_vocab_size(find_shards(folder)))  # llama2: -1


def _stage_model(ckpt, layers):
    """A stage's Transformer, loaded as Llama.build loads it (one process)."""
    from llama.weights.args import ModelArgs
    from llama.weights.checkpoint import load_rank_state
    from llama.parallel.distributed import init_distributed
    from llama.model import Transformer
    from llama.text.tokenizer import Tokenizer
    from llama.builder import with_tokenizer_vocab
    from llama.weights.stages import model_folder, read_record

    init_distributed("cpu")
    folder = model_folder(ckpt)
    args = ModelArgs.from_json(folder / "params.json", max_seq_len=32, max_batch_size=2)
    raw = args.vocab_size
    args = with_tokenizer_vocab(args, Tokenizer.from_file(folder / "tokenizer.model"), folder)
    record = read_record(folder)
    held = range(*record["layers"]) if record else None
    state, layout = load_rank_state(folder, args, 0, 1, raw, layers=layers, held=held)
    with torch.device("meta"):
        model = Transformer(args, embedding_layout=layout, layers=layers)
    model.load_state_dict(state, strict=True, assign=True)
    model.setup_caches("cpu", torch.float32)
    return model, state
