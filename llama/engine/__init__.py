"""The engine wing: the decoding engine (slots, queue, step loop), sampling
(and, over a vocabulary split across ranks, vocab_parallel), the model runner
(one stage or a pipeline of them) and request metrics."""
