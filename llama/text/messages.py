"""What a conversation is made of: messages, dialogs, why an answer stopped.

Plain data, no torch: the chat formats, the generation engine, the
interactive chat and the tests all speak these types.
"""

from enum import Enum
from typing import List, Literal, Sequence, TypedDict

from .tool_calls import ToolCall

Role = Literal["system", "user", "assistant", "ipython"]


class StopReason(str, Enum):
    """Why generation of one answer ended."""

    END_OF_TURN = "end_of_turn"  # eos / <|end_of_text|> / <|eot_id|>: the answer is complete
    END_OF_MESSAGE = "end_of_message"  # <|eom_id|>: the model waits for a tool result
    OUT_OF_TOKENS = "out_of_tokens"  # max_gen_len or max_seq_len reached first
    STOP_STRING = "stop_string"  # one of the request's stop strings appeared (the text is cut before it)
    CANCELLED = "cancelled"  # the caller cancelled the request

    @classmethod
    def for_stop_token(cls, token: int, tokenizer) -> "StopReason":
        """The reason a stop token of `tokenizer` gives: <|eom_id|> waits for a tool result."""
        if token == tokenizer.special_tokens.get("<|eom_id|>"):
            return cls.END_OF_MESSAGE
        return cls.END_OF_TURN


class _RequiredMessage(TypedDict):
    role: Role
    content: str


class Message(_RequiredMessage, total=False):
    """A message: `role` and `content`; assistant messages may also have

    tool_calls: the tool calls it makes (Llama 3.1), written after the content.
    stop_reason: how the model ended it. END_OF_MESSAGE is encoded as
        <|eom_id|> (the model waits for a tool result), the others as
        <|eot_id|>. Without it, a message with a call after <|python_tag|> ends
        with <|eom_id|>, as the model writes those.
    """

    tool_calls: List[ToolCall]
    stop_reason: StopReason


Dialog = Sequence[Message]


class DialogError(ValueError):
    """A dialog that no chat format can encode; the message says why."""
