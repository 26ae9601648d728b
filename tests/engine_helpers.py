"""Driving the engine step by step, shared by the engine and compiled-decoding tests."""


def run_to_end(engine, schedule, max_steps=200):
    """Steps `engine`; schedule maps a step number to requests submitted before it.
    Returns {request id: [tokens]}, {request id: last event}."""
    tokens, last, ids = {}, {}, []
    for step in range(max_steps):
        for request in schedule.get(step, []):
            ids.append(engine.submit(request))
        if not engine.has_work() and step > max(schedule):
            break
        for e in engine.step():
            if e.token is not None:
                tokens.setdefault(e.row, []).append(e.token)
            if e.stop_reason is not None:
                last[e.row] = e
    return [tokens.get(i, []) for i in ids], [last[i] for i in ids]


def encode(gen, texts):
    return [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]


PROMPTS = ["A llama", "The transformer has an embedding table and a stack of layers", "Hi", "Model parallelism"]
