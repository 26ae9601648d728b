"""llama/weights/progress.py: the progress line of the converter and the sharding tool."""

import io

from llama.weights.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_line_is_redrawn_in_place():
    out = Terminal()
    with Progress("converting", 3, "tensors", out, interval=0) as p:
        p.update(1, 2_000_000)
        p.update(2, 1_000_000)
    text = out.getvalue()
    assert text.count("\r\033[K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "converting: 3/3 tensors, 3.0 MB, " in text.rsplit("\r", 1)[-1]
    assert " MB/s, " in text


def test_log_gets_whole_lines_rarely():
    out = io.StringIO()
    p = Progress("writing", 2, "shards", out, interval=0)
    for _ in range(100):
        p.update(nbytes=10)
    p.update(items=2)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("writing: 2/2 shards, 0.0 MB, ")  # updates under 5 s are not logged
    p.close()  # closing twice writes nothing more
    assert out.getvalue().splitlines() == lines


def test_silent_without_output():
    p = Progress("x", 1, "tensors", None)
    p.update(1, 10)
    p.close()
    assert p.done == 1 and p.nbytes == 10
