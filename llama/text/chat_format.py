"""Dialogs to prompt tokens, and generated tokens back to messages: Llama 2
`[INST]`, Llama 3 header (with Llama 3.1 tool calls) and ChatML formats.

The format follows the tokenizer (`ChatFormat.for_tokenizer`): SentencePiece
means Llama 2, tiktoken means Llama 3 / 3.1, and a BPE tokenizer converted
from GGUF names its format (ChatML) in its sidecar. No torch here.
"""

from abc import ABC, abstractmethod
from typing import List, Sequence

from .messages import Dialog, DialogError, Message, Role, StopReason  # noqa: F401 (re-exported)
from .tokenizer import Tokenizer
from .tool_calls import ToolCall, parse_tool_call


def _check_messages(dialog: Dialog, roles: Sequence[str]) -> None:
    if isinstance(dialog, (str, bytes, dict)) or not isinstance(dialog, Sequence):
        raise DialogError(f"a dialog is a list of messages, got {type(dialog).__name__}")
    if not dialog:
        raise DialogError("the dialog is empty: give at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
        if "ipython" not in roles and (msg["role"] == "ipython" or msg.get("tool_calls")):
            what = "a tool result (role ipython)"
            if msg["role"] != "ipython":
                what = "an assistant message with tool calls"
            raise DialogError(f"message {i} is {what}, but tool calling needs Llama 3.1")
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


def _check_tool_fields(dialog: Dialog) -> None:
    """Checks `tool_calls` and `stop_reason`, the optional keys of assistant messages."""
    for i, msg in enumerate(dialog):
        calls = msg.get("tool_calls")
        if calls and msg["role"] != "assistant":
            raise DialogError(f"message {i} ({msg['role']}) has tool_calls; only assistant messages make tool calls")
        if calls is not None and not (isinstance(calls, (list, tuple)) and all(isinstance(c, ToolCall) for c in calls)):
            raise DialogError(f"message {i} tool_calls must be a list of llama.ToolCall, got {calls!r:.80}")
        for j, call in enumerate(calls or ()):
            try:
                call.render()
            except ValueError as e:
                raise DialogError(f"message {i}, tool call {j}: {e}") from None
        if "stop_reason" in msg and msg["stop_reason"] not in {r.value for r in StopReason}:
            raise DialogError(
                f"message {i} has stop_reason {msg['stop_reason']!r}; use one of {[r.value for r in StopReason]}"
            )


class ChatFormat(ABC):
    """Turns a dialog into the prompt tokens its model was fine-tuned on."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def for_tokenizer(tokenizer: Tokenizer) -> "ChatFormat":
        formats = {"sentencepiece": Llama2ChatFormat, "tiktoken": Llama3ChatFormat, "bpe": ChatMLChatFormat}
        if tokenizer.kind not in formats:
            raise ValueError(f"no chat format for a {tokenizer.kind} tokenizer")
        return formats[tokenizer.kind](tokenizer)

    @abstractmethod
    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        """Prompt tokens for the assistant's next turn; raises DialogError if malformed."""

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        """The assistant message made of generated `tokens` (a trailing stop
        token, if given, sets the stop reason). Formats without tool calls give
        the decoded text as content."""
        tokens, stop_reason = self._without_stop_token(tokens, stop_reason)
        content = self.tokenizer.decode(tokens)
        return {"role": "assistant", "content": content, "tool_calls": [], "stop_reason": stop_reason}

    def _without_stop_token(self, tokens: Sequence[int], stop_reason: StopReason):
        tokens, stop_reason = list(tokens), StopReason(stop_reason)
        if tokens and tokens[-1] in self.tokenizer.stop_tokens:
            stop_reason = StopReason.for_stop_token(tokens.pop(), self.tokenizer)
        return tokens, stop_reason


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
        """Header, stripped content, tool calls (each after <|python_tag|> if
        its syntax has one), then <|eom_id|> or <|eot_id|> (see `Message`)."""
        special = self.tokenizer.special_tokens
        tokens = self.encode_header(message["role"])
        tokens += self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        calls = message.get("tool_calls") or []
        for call in calls:
            if call.syntax.python_tag:
                tokens.append(special["<|python_tag|>"])
            tokens += self.tokenizer.encode(call.render(), bos=False, eos=False)
        if message["role"] == "assistant" and "stop_reason" in message:
            eom = message["stop_reason"] == StopReason.END_OF_MESSAGE
        else:
            eom = any(call.syntax.python_tag for call in calls)
        return tokens + [special["<|eom_id|>" if eom else "<|eot_id|>"]]

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog, ("system", "user", "assistant", "ipython"))
        _check_order(dialog, self.FOLLOWS)
        _check_tool_fields(dialog)
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")

    def decode_assistant_message(self, tokens: Sequence[int], stop_reason: StopReason) -> Message:
        """The assistant message made of generated `tokens`, with its tool calls.

        Text before <|python_tag|> is content; each piece after a tag is one
        call, and a piece that is no builtin or JSON call is code_interpreter
        code (Meta's rule; this also keeps the tag of a cut-off call, so check
        `stop_reason` before running anything). Without a tag, an answer that
        is entirely a function-tag or JSON call is that call, and malformed or
        cut-off call text stays content. A trailing stop token, if given, sets
        the stop reason.

        Never raises. `encode_message` of the result gives back the header,
        `tokens` and the end token, unless the content has surrounding
        whitespace (stripped, as in every message) or the tokens are not the
        ones the tokenizer would choose for their text.
        """
        tokens, stop_reason = self._without_stop_token(tokens, stop_reason)
        tag = self.tokenizer.special_tokens["<|python_tag|>"]
        if tag in tokens:
            first = tokens.index(tag)
            content = self.tokenizer.decode(tokens[:first])
            pieces = _split(tokens[first + 1 :], tag)
            calls = [parse_tool_call(self.tokenizer.decode(piece), python_tag=True) for piece in pieces]
        else:
            content = self.tokenizer.decode(tokens)
            call = parse_tool_call(content, python_tag=False)
            content, calls = ("", [call]) if call else (content, [])
        return {"role": "assistant", "content": content, "tool_calls": calls, "stop_reason": stop_reason}


def _split(tokens: List[int], sep: int) -> List[List[int]]:
    pieces: List[List[int]] = [[]]
    for t in tokens:
        if t == sep:
            pieces.append([])
        else:
            pieces[-1].append(t)
    return pieces


class ChatMLChatFormat(ChatFormat):
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then an open
    `<|im_start|>assistant\\n` (SmolLM2 and other ChatML models).

    As in these models' own templates: no bos, contents are not stripped, and
    a dialog without a system message gets the tokenizer's default system
    prompt (`default_system_prompt`, from the model's template) if it has one;
    give a system message, even an empty one, to replace it.
    """

    FOLLOWS = Llama2ChatFormat.FOLLOWS

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"{tokenizer.path} has no {' or '.join(missing)} special token: it is not a ChatML tokenizer")

    def encode_header(self, role: str) -> List[int]:
        return [self.tokenizer.special_tokens["<|im_start|>"]] + self.tokenizer.encode(f"{role}\n", bos=False, eos=False)

    def encode_message(self, message: Message) -> List[int]:
        # Role and content are one piece of text, as when the model's template
        # renders the dialog and the whole string is tokenized.
        special = self.tokenizer.special_tokens
        return (
            [special["<|im_start|>"]]
            + self.tokenizer.encode(f"{message['role']}\n{message['content']}", bos=False, eos=False)
            + [special["<|im_end|>"]]
            + self.tokenizer.encode("\n", bos=False, eos=False)
        )

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        _check_messages(dialog, ("system", "user", "assistant"))
        _check_order(dialog, self.FOLLOWS)
        default = getattr(self.tokenizer, "default_system_prompt", None)
        if dialog[0]["role"] != "system" and default is not None:
            dialog = [{"role": "system", "content": default}, *dialog]
        tokens: List[int] = []
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")


def chat_format_name(formatter: ChatFormat) -> str:
    """"Llama 2", "Llama 3" or "ChatML"."""
    return {"Llama2ChatFormat": "Llama 2", "Llama3ChatFormat": "Llama 3"}.get(
        type(formatter).__name__, type(formatter).__name__.replace("ChatFormat", ""))
