"""The chat's terminal: line editing and history, and Ctrl-C that stops an answer.

On a terminal, lines are read with the standard library's `readline` (arrow
keys, Ctrl-R, history kept across sessions in $LLAMA_HISTORY_FILE, else
$XDG_STATE_HOME/llama/history, else ~/.llama_history). From a pipe, lines are
read as before (`read_line_rank0`). Either way rank 0 reads and every rank
gets the line.

Ctrl-C during an answer (`CtrlC`) sets a flag that the chat checks after each
token, so the generator is closed between steps, never interrupted inside
one; a second Ctrl-C during the same answer interrupts at once. This needs one
process: under torchrun the terminal's Ctrl-C goes to torchrun (its workers run
in sessions of their own), which stops every worker.
"""

import atexit
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from .rank0_input import from_rank0, read_line_rank0


def history_path() -> Optional[Path]:
    """Where the chat keeps its input history; LLAMA_HISTORY_FILE="" turns it off."""
    if "LLAMA_HISTORY_FILE" in os.environ:
        return Path(os.environ["LLAMA_HISTORY_FILE"]) if os.environ["LLAMA_HISTORY_FILE"] else None
    if os.environ.get("XDG_STATE_HOME"):
        return Path(os.environ["XDG_STATE_HOME"]) / "llama" / "history"
    return Path.home() / ".llama_history"


def _single_process() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_world_size() == 1


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class LineReader:
    """`reader(prompt)` -> the line typed on rank 0 (on every rank), None at
    the end of input (Ctrl-D, or Ctrl-C at the prompt)."""

    def __init__(self, history: Optional[Path] = None):
        self.tty = from_rank0(_is_rank0() and sys.stdin.isatty())
        self.readline = None
        if self.tty and _is_rank0():
            try:
                import readline  # noqa: F401 - importing it gives input() line editing
            except ImportError:  # Windows, or a Python built without it: plain input()
                return
            self.readline = readline
            self._load_history(history if history is not None else history_path())

    def _load_history(self, path: Optional[Path]) -> None:
        self.readline.set_history_length(1000)
        if path is None:
            return
        try:
            if path.is_file():
                self.readline.read_history_file(str(path))
        except OSError:
            pass  # an unreadable history is no reason not to chat
        atexit.register(self._save_history, path)

    def _save_history(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(path))
        except OSError:
            pass

    def __call__(self, prompt: str) -> Optional[str]:
        if not self.tty:
            return read_line_rank0(prompt)
        line = None
        if _is_rank0():
            try:
                # With readline, input(prompt) lets it redraw the prompt when editing.
                line = input(prompt) if self.readline else _plain_input(prompt)
            except EOFError:  # Ctrl-D
                print()
            except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
                print()
        return from_rank0(line)


def _plain_input(prompt: str) -> str:
    print(prompt, end="", flush=True)  # input(prompt) without readline writes it to stderr
    return input()


class CtrlC:
    """`with CtrlC() as ctrl_c:` ... `if ctrl_c.pressed: stop`. In one
    process in the main thread only; otherwise Ctrl-C keeps its default
    effect (KeyboardInterrupt), since stopping one rank's generation alone
    would leave the others waiting for it."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.pressed:  # pressed twice: stop now
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread() and _single_process():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
