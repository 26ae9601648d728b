"""An interactive, multi-turn chat: streams answers, keeps the conversation,
completes tool calls with local tools, and takes /commands (`llama chat`,
`example_chat_completion.py --interactive`). The terminal side (line editing,
Ctrl-C) is in terminal.py.

Under torchrun every rank must run the same generation steps, so every rank
runs the session; rank 0 alone reads the keyboard and prints, and whatever
enters the dialog from outside the model (the user's lines, the date in the
system prompt, tool results) is taken from rank 0 (`from_rank0`, in
rank0_input.py).
"""

from datetime import date
from typing import Callable, List, Mapping, Optional

from ..text.chat_format import DialogError, Llama3ChatFormat, Message, StopReason
from .dialog_file import load_dialog, save_dialog
from .local_tools import LOCAL_TOOLS, LocalTool, run_tool_call
from .rank0_input import from_rank0, read_line_rank0  # noqa: F401 (read_line_rank0 re-exported)
from .terminal import CtrlC
from ..text.tool_calls import ToolCall, system_prompt

INSTRUCTIONS = "You are a helpful assistant."
NEW_CONVERSATION = "/new"
COMMANDS = """Commands:
  /system TEXT  use TEXT as the system prompt (/system alone shows it)
  /new          start a new conversation (keeps the system prompt)
  /save FILE    save the conversation as JSON
  /load FILE    continue a conversation saved with /save
  /help         this list
An empty line, Ctrl-D or Ctrl-C at the prompt ends the chat; Ctrl-C during an answer stops the answer.
"""
_STOPPED = object()  # _answer's result when Ctrl-C stopped the answer


class ChatSession:
    """One conversation with a generator (a `Llama`, or any object with its
    `formatter`, `model.params.max_seq_len` and `chat_completion_stream`).

    Llama 3 formats get a system prompt that offers `tools` (default: a
    calculator and a clock) as custom tools, followed by `system` (default:
    INSTRUCTIONS); other formats have no tool calling, and `system` (if any)
    is the whole system prompt. `labels=False` writes the answers alone (for
    one-shot use, without "> Assistant: "); `note` (default: `write`) takes
    the bracketed remarks (tool results, cut-off answers).
    """

    def __init__(
        self,
        generator,
        write: Callable[[str], None],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        tools: Mapping[str, LocalTool] = LOCAL_TOOLS,
        max_tool_rounds: int = 4,
        system: Optional[str] = None,
        labels: bool = True,
        note: Optional[Callable[[str], None]] = None,
        sampling=None,
    ):
        self.generator = generator
        self.formatter = generator.formatter
        self.max_seq_len = generator.model.params.max_seq_len
        self.write = write
        self.note = note or write
        self.labels = labels
        # A SamplingParams, when given, replaces temperature and top_p (see Llama.generate).
        self.sampling = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        if sampling is not None:
            self.sampling = dict(max_gen_len=max_gen_len, sampling=sampling)
        self.tools = dict(tools) if isinstance(self.formatter, Llama3ChatFormat) else {}
        self.max_tool_rounds = max_tool_rounds
        self.system: Optional[str] = None
        self.dialog: List[Message] = []
        self.set_system(system)

    def set_system(self, instructions: Optional[str]) -> None:
        """Sets the system prompt (with the tool definitions, if the model has tools), keeping the conversation."""
        system = instructions
        if self.tools:
            definitions = [tool.definition for tool in self.tools.values()]
            # The date must be rank 0's: ranks may straddle midnight.
            system = from_rank0(system_prompt(custom_tools=definitions, instructions=instructions or INSTRUCTIONS,
                                              today=date.today()))
        self.system = system
        rest = [m for m in self.dialog if m["role"] != "system"]
        self.dialog = ([{"role": "system", "content": system}] if system is not None else []) + rest

    def reset(self) -> None:
        """Starts a new conversation."""
        self.dialog = [{"role": "system", "content": self.system}] if self.system is not None else []

    def banner(self) -> str:
        """What the chat offers: commands and tools, or why there are no tools."""
        if self.tools:
            tools = f"Tools: {', '.join(self.tools)} (run here when the model calls them)."
            if not getattr(self.generator.model.params, "use_scaled_rope", True):
                tools += " Llama 3.1 is trained to call tools; this looks like Llama 3, which may not use them."
        else:
            from ..text.chat_format import chat_format_name

            tools = (f"No tools: this model's chat format ({chat_format_name(self.formatter)}) has no tool calling, "
                     "so it cannot calculate or look up the date; its answers to such questions are guesses.")
        return (f"Chatting. /help lists the commands; an empty line or Ctrl-D ends, {NEW_CONVERSATION} starts a "
                f"new conversation, Ctrl-C stops an answer.\n{tools}\n")

    def run(self, read_line: Optional[Callable[[str], Optional[str]]] = None) -> None:
        """Reads user lines until an empty line or the end of input, answering
        each; lines starting with / are commands (COMMANDS)."""
        if read_line is None:
            from .terminal import LineReader

            read_line = LineReader()
        self.write(self.banner())
        try:
            while True:
                line = read_line("\n> User: ")
                if line is None or not line.strip():
                    self.write("\n" if line is None else "")
                    return
                if line.startswith("/"):
                    self.command(line.strip())
                else:
                    self.ask(line)
        except KeyboardInterrupt:  # Ctrl-C ends the chat too, without a traceback
            self.write("\n")

    def command(self, line: str) -> None:
        """Runs one /command line (every rank runs it; rank 0 alone touches files)."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == NEW_CONVERSATION:
            self.reset()
            self.write("(new conversation)\n")
        elif name == "/help":
            self.write(COMMANDS)
        elif name == "/system" and not arg:
            default = getattr(self.formatter.tokenizer, "default_system_prompt", None)
            if self.system is not None:
                self.write(f"(system prompt: {self.system!r})\n")
            else:
                self.write(f"(no system prompt; the model's default applies: {default!r})\n" if default else
                           "(no system prompt)\n")
        elif name == "/system":
            self.set_system(arg)
            self.write("(system prompt set)\n")
        elif name in ("/save", "/load") and not arg:
            self.write(f"({name} needs a file name: {name} FILE)\n")
        elif name == "/save":
            path, error = self._rank0_result(lambda: save_dialog(self.dialog, arg))
            self.write(f"(error: {error})\n" if error else f"(saved {len(self.dialog)} messages to {path})\n")
        elif name == "/load":
            self._load(arg)
        else:
            self.write(f"(unknown command {name}; /help lists the commands)\n")

    def _load(self, path: str) -> None:
        """Replaces the conversation with the dialog in `path`, or, if the file
        cannot be read or the model could not continue it, says why and keeps
        the conversation as it was (load_dialog raises only OSError and
        ValueError subclasses, so no file ends the chat)."""
        def read():
            dialog = load_dialog(path)
            if dialog and dialog[-1]["role"] != "assistant" and dialog[-1]["role"] != "system":
                raise ValueError(f"{path}: the last message must be the assistant's (or the system prompt)")
            # The chat format checks roles, order and contents as if the user spoke next.
            tokens = self.formatter.encode_dialog_prompt(list(dialog) + [{"role": "user", "content": "?"}])
            if len(tokens) >= self.max_seq_len:
                raise ValueError(f"{path} holds a conversation of {len(tokens):,} tokens, more than this model's "
                                 f"context (--max_seq_len {self.max_seq_len:,}) holds: run the chat with a larger "
                                 "--max_seq_len, or keep only the part of the conversation you need")
            return dialog

        dialog, error = from_rank0(self._rank0_result(read))
        if error is not None:
            self.write(f"(error: {error}; the conversation is unchanged)\n")
            return
        self.dialog = dialog
        self.system = dialog[0]["content"] if dialog and dialog[0]["role"] == "system" else None
        self.write(f"(loaded {len(dialog)} messages from {path})\n")

    @staticmethod
    def _rank0_result(action):
        """(result, None) or (None, error message) of `action` on rank 0;
        (None, None) elsewhere: files are rank 0's."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return None, None
        try:
            return action(), None
        except (OSError, ValueError) as e:
            return None, str(e)

    def ask(self, text: str) -> Optional[Message]:
        """Adds a user message and answers it, completing tool calls on the way.

        Returns the final assistant message, or None if the conversation no
        longer fits in max_seq_len, or Ctrl-C stopped the answer (then it is
        left as it was before `text`).
        """
        start = len(self.dialog)
        self.dialog.append({"role": "user", "content": text})
        for round_ in range(self.max_tool_rounds + 1):
            try:
                message = self._answer()
            except DialogError as e:  # e.g. "[INST]" typed to Llama 2: say so, keep chatting
                del self.dialog[start:]
                self.note(f"[not sent: {e}]\n")
                return None
            if message is _STOPPED:
                del self.dialog[start:]
                self.note("[stopped; this question is not kept in the conversation]\n")
                return None
            if message is None:
                del self.dialog[start:]
                self.note(self._does_not_fit(fresh=start == (1 if self.system is not None else 0)))
                return None
            self.dialog.append(message)
            if message["stop_reason"] == StopReason.OUT_OF_TOKENS:
                self.note("[cut off: the answer reached max_gen_len or max_seq_len]\n")
                return message
            if not message["tool_calls"]:
                return message
            if round_ == self.max_tool_rounds:
                self.note(f"[stopped after {self.max_tool_rounds} rounds of tool calls]\n")
                return message
            self.dialog.append({"role": "ipython", "content": self._run_tools(message["tool_calls"])})
        return None  # not reached

    def _does_not_fit(self, fresh: bool) -> str:
        if not fresh:
            return (f"[the conversation no longer fits max_seq_len={self.max_seq_len}; start a new one with "
                    f"{NEW_CONVERSATION}, or quit (empty line) and raise --max_seq_len]\n")
        system = ""
        if self.system:
            n = len(self.formatter.encode_dialog_prompt([{"role": "system", "content": self.system},
                                                         {"role": "user", "content": ""}]))
            what = "the system prompt with the tool definitions" if self.tools else "the system prompt"
            system = f" ({what} takes {n} tokens)"
        return f"[this does not fit max_seq_len={self.max_seq_len}{system}; shorten it or raise --max_seq_len]\n"

    def _answer(self):
        """Streams the assistant's next message; None if the prompt does not
        fit, _STOPPED if Ctrl-C stopped it (the stream is closed at once)."""
        if len(self.formatter.encode_dialog_prompt(self.dialog)) >= self.max_seq_len:
            return None
        if self.labels:
            self.write("> Assistant: ")
        tokens, stop_reason, ended = [], StopReason.OUT_OF_TOKENS, False
        stream = self.generator.chat_completion_stream(self.dialog, **self.sampling)
        with CtrlC() as ctrl_c:
            try:
                for event in stream:
                    if ctrl_c.pressed:
                        break
                    self.write(event.text)
                    tokens.append(event.token)  # a final stop token is dropped by the decoder
                    stop_reason = event.stop_reason or stop_reason
                    ended = event.stop_reason is not None
            finally:
                stream.close()  # frees the generation at once, whether it ended, broke off or failed
        self.write("\n")
        if ctrl_c.pressed and not ended:
            return _STOPPED
        return self.formatter.decode_assistant_message(tokens, stop_reason)

    def _run_tools(self, calls: List[ToolCall]) -> str:
        """Runs the calls and returns the tool message's text (rank 0's, on every rank)."""
        results = []
        for call in calls:
            result = run_tool_call(call, self.tools)
            self.note(f"  [{call.tool_name}] {result}\n")
            results.append(result if len(calls) == 1 else f"{call.tool_name}: {result}")
        return from_rank0("\n".join(results))
