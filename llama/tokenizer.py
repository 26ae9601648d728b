"""`llama.tokenizer` as Meta's repositories name it: the tokenizer and chat
format, re-exported from the text wing (llama/text/)."""

from .text.chat_format import ChatFormat
from .text.tokenizer import Tokenizer, TokenizerError

__all__ = ["ChatFormat", "Tokenizer", "TokenizerError"]
