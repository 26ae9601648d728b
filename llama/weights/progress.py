"""A small progress line for long jobs (converting, sharding): items done,
megabytes and MB/s, on stderr. No dependency: on a terminal the line is
redrawn in place; in a log file one line is written every few seconds."""

import time
from typing import Optional, TextIO


class Progress:
    """`with Progress("converting", total=272, unit="tensors") as p: p.update(1, nbytes)`.

    `out=None` makes it silent, so library code can always call it.
    """

    def __init__(self, desc: str, total: int, unit: str, out: Optional[TextIO] = None, interval: float = 0.2):
        self.desc, self.total, self.unit, self.out = desc, total, unit, out
        self.done, self.nbytes = 0, 0
        self.start = self.last = time.perf_counter()
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self.interval = interval if self.tty else max(interval, 5.0)

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        mb = self.nbytes / 1e6
        return (f"{self.desc}: {self.done}/{self.total} {self.unit}, {mb:,.1f} MB, "
                f"{mb / seconds:,.1f} MB/s, {seconds:.1f} s")

    def update(self, items: int = 0, nbytes: int = 0) -> None:
        self.done += items
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.out is not None and now - self.last >= self.interval:
            self.last = now
            self._write(final=False)

    def _write(self, final: bool) -> None:
        if self.tty:
            self.out.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self._write(final=True)
            self.out = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
