"""Generated tokens to text, increment by increment, with stop strings cut
exactly. No torch: the engine feeds it one token at a time per row.
"""

from typing import List, Optional, Sequence, Tuple


class TextStream:
    """Turns one row's tokens into text increments.

    Decoding a token on its own loses context (SentencePiece drops a leading
    space; a multi-byte character may span tokens), so each step decodes a
    short window and emits what it adds, holding back incomplete characters.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens before this are emitted

    def add(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""  # wait for the rest of a multi-byte character
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return text[len(prefix_text) :]


class StopStrings:
    """Finds the first stop string in a stream of text increments.

    Text that could still become the start of a stop string is held back, so
    what has been emitted never contains (part of) one: the cut is exact even
    when a stop string spans several tokens, streaming or not.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit, whether a stop string was found). After a find,
        the emitted text ends right before the stop string."""
        if not self.stops:
            return text, False
        buf = self.held + text
        found: Optional[int] = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (found is None or i < found):
                found = i
        if found is not None:
            self.held = ""
            return buf[:found], True
        keep = self._partial_suffix(buf)
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, when the row ends for another reason."""
        text, self.held = self.held, ""
        return text

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of `buf` that begins some stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:n]):
                    longest = n
                    break
        return longest
