"""The weights wing: model arguments, the weight schema, reading, writing and
resharding checkpoints, manifests, pipeline stage folders, GGUF import
(gguf.py: params and tensors; the tokenizer half is text/gguf_vocab.py) and
export (gguf_export.py), random checkpoints (random_weights.py).

Imports neither the model nor the text wing: a checkpoint is tensors and
params.json, whatever reads it. The gguf package is an optional extra,
imported only when a GGUF file is read or written."""
