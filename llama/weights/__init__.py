"""The weights wing: model arguments, the weight schema, reading, writing and
resharding checkpoints, manifests, pipeline stage folders, GGUF import.

Imports neither the model nor the text wing: a checkpoint is tensors and
params.json, whatever reads it."""
