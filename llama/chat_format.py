"""Dialogs to prompt tokens: Llama 2 `[INST]` and Llama 3 header formats.

The format follows the tokenizer (`ChatFormat.for_tokenizer`): SentencePiece
means Llama 2, tiktoken means Llama 3 / 3.1. No torch here.
"""

from abc import ABC, abstractmethod
from enum import Enum
from typing import List, Literal, Sequence, TypedDict

from .tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = Sequence[Message]


class StopReason(str, Enum):
    """Why generation of one answer ended."""

    END_OF_TURN = "end_of_turn"  # eos / <|end_of_text|> / <|eot_id|>: the answer is complete
    END_OF_MESSAGE = "end_of_message"  # <|eom_id|>: the model waits for a tool result
    OUT_OF_TOKENS = "out_of_tokens"  # max_gen_len or max_seq_len reached first

    @classmethod
    def for_stop_token(cls, token: int, tokenizer: Tokenizer) -> "StopReason":
        if token == tokenizer.special_tokens.get("<|eom_id|>"):
            return cls.END_OF_MESSAGE
        return cls.END_OF_TURN


class DialogError(ValueError):
    """A dialog that no chat format can encode; the message says why."""


def _check_messages(dialog: Dialog, roles: Sequence[str]) -> None:
    if isinstance(dialog, (str, bytes, dict)) or not isinstance(dialog, Sequence):
        raise DialogError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise DialogError("the dialog is empty: give at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        if msg["role"] not in roles:
            raise DialogError(f"message {i} has unknown role {msg['role']!r}; this model knows {list(roles)}")
        if not isinstance(msg["content"], str):
            raise DialogError(f"message {i} content must be a string, got {type(msg['content']).__name__}")
    for i, msg in enumerate(dialog[1:], 1):
        if msg["role"] == "system":
            raise DialogError(f"message {i} is a system message: only the first message may be one")


def _check_order(dialog: Dialog, follows: dict) -> None:
    """`follows[role]` lists the roles that may come right after `role`."""
    previous = "system"
    for i, msg in enumerate(dialog):
        if i == 0 and msg["role"] == "system":
            continue
        if msg["role"] not in follows[previous]:
            raise DialogError(
                f"message {i} ({msg['role']}) cannot follow a {previous} message; "
                f"after {previous} comes {' or '.join(follows[previous])}"
            )
        previous = msg["role"]
    if dialog[-1]["role"] not in follows["assistant_may_answer"]:
        raise DialogError(
            f"the last message is from {dialog[-1]['role']}; it must be from "
            f"{' or '.join(follows['assistant_may_answer'])} so that the assistant answers it"
        )


class ChatFormat(ABC):
    """Turns a dialog into the prompt tokens its model was fine-tuned on."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def for_tokenizer(tokenizer: Tokenizer) -> "ChatFormat":
        formats = {"sentencepiece": Llama2ChatFormat, "tiktoken": Llama3ChatFormat}
        if tokenizer.kind not in formats:
            raise ValueError(f"no chat format for a {tokenizer.kind} tokenizer")
        return formats[tokenizer.kind](tokenizer)

    @abstractmethod
    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Prompt tokens for the assistant's next turn; raises DialogError if malformed."""


class Llama2ChatFormat(ChatFormat):
    """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>` ..."""

    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
    FOLLOWS = {"system": ["user"], "user": ["assistant"], "assistant": ["user"], "assistant_may_answer": ["user"]}

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog, ("system", "user", "assistant"))
        _check_order(dialog, self.FOLLOWS)
        for i, msg in enumerate(dialog):
            for tag in self.SPECIAL_TAGS:
                if tag in msg["content"]:
                    # SentencePiece has no control tokens: these tags would be
                    # read as real turn boundaries (prompt injection).
                    raise DialogError(f"message {i} contains {tag!r}, which Llama 2 reads as a turn marker; remove it")
        if dialog[0]["role"] == "system":
            first = self.B_SYS + dialog[0]["content"] + self.E_SYS + dialog[1]["content"]
            dialog = [{"role": "user", "content": first}] + list(dialog[2:])
        tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            text = f"{self.B_INST} {prompt['content'].strip()} {self.E_INST} {answer['content'].strip()} "
            tokens += self.tokenizer.encode(text, bos=True, eos=True)
        tokens += self.tokenizer.encode(f"{self.B_INST} {dialog[-1]['content'].strip()} {self.E_INST}", bos=True, eos=False)
        return tokens


class Llama3ChatFormat(ChatFormat):
    """`<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`
    per message, then an open assistant header."""

    FOLLOWS = {
        "system": ["user"],
        "user": ["assistant"],
        "assistant": ["user", "ipython"],
        "ipython": ["assistant"],  # a tool result goes back to the assistant
        "assistant_may_answer": ["user", "ipython"],
    }

    def encode_header(self, role: str) -> List[int]:
        special = self.tokenizer.special_tokens
        return (
            [special["<|start_header_id|>"]]
            + self.tokenizer.encode(role, bos=False, eos=False)
            + [special["<|end_header_id|>"]]
            + self.tokenizer.encode("\n\n", bos=False, eos=False)
        )

    def encode_message(self, message: Message) -> List[int]:
        content = self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        return self.encode_header(message["role"]) + content + [self.tokenizer.special_tokens["<|eot_id|>"]]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog, ("system", "user", "assistant", "ipython"))
        _check_order(dialog, self.FOLLOWS)
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")
