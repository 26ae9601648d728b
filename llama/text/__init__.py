"""The text wing: messages, tokenizers, chat formats, tool calls, streamed text.

Plain Python: imports no torch and nothing of llama but `llama.common`, so
tokenizing and chat formatting work (and test) without the model."""
