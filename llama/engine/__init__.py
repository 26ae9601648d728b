"""The engine wing: the decoding engine (slots, queue, step loop), sampling,
the model runner (one stage or a pipeline of them) and request metrics."""
