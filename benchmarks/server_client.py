"""The client side of benchmarks/server_benchmark.py: our server and
llama-cpp-python's started as subprocesses on free ports, streaming chat
requests timed chunk by chunk, and the statistics and tables of the figures.

A `Stream` keeps the clock time of every server-sent event that carries text,
so time to first token (TTFT), the gaps between tokens (ITL) and the decode
rate all come from the same record, measured the same way for both servers.
Token counts come from re-encoding the answer with our tokenizer (the two
servers share SmolLM2's vocabulary; llama-cpp-python's stream has no usage),
so a chunk that carries several tokens (speculation) is counted right.

Failure modes: a server that exits or is not answering /v1/models within
`ready_s` raises RuntimeError with the tail of its log; a request that fails
(HTTP error, error event) is kept as a Stream with `error` set, and the
callers refuse to report figures from it.
"""

import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import httpx

REPO = Path(__file__).resolve().parent.parent

# llama-cpp-python's server run without llama.cpp's AMX / repacked weight buffers
# (benchmarks/llamacpp_peer.without_extra_buffers: they crash Q8_0 evals on AMX CPUs).
# Only when asked: without them F32 prefill is many times slower here.
LLAMACPP_NO_EXTRA_BUFFERS = ("import sys; from benchmarks.llamacpp_peer import without_extra_buffers; without_extra_buffers(); "
                 "from llama_cpp.server.__main__ import main; sys.argv[0] = 'llama_cpp.server'; main()")


def parse_sse(lines: Iterable[str]) -> Iterator[Union[dict, str]]:
    """The payloads of an SSE stream: each `data:` line's JSON as a dict, "[DONE]"
    as the string. Blank lines, comments (": ping ...", sent by llama-cpp-python
    while it is busy) and other fields (event:, id:, retry:) carry no payload."""
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        yield data if data == "[DONE]" else json.loads(data)


def delta_text(payload: dict) -> str:
    """The text a chat-completion chunk adds ("" for role-only, usage-only and final chunks)."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


@dataclass
class Stream:
    """One streaming request: when it was sent, and when each piece of text arrived."""

    sent: float
    times: List[float] = field(default_factory=list)
    pieces: List[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    tokens: int = 0  # filled in by count_tokens

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def done(self) -> float:
        return self.times[-1]

    def gaps(self) -> List[float]:
        """(arrival time, seconds since the previous piece) of every piece after the first."""
        return [(b, b - a) for a, b in zip(self.times, self.times[1:])]

    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time from the first piece to the last."""
        span = self.times[-1] - self.times[0]
        return (self.tokens - 1) / span if span > 0 and self.tokens > 1 else float("nan")


def feed(stream: Stream, payload: Union[dict, str], now: float) -> None:
    """Records one SSE payload of `stream`, arrived at `now`."""
    if payload == "[DONE]":
        return
    if "error" in payload:
        stream.error = json.dumps(payload["error"])[:300]
        return
    text = delta_text(payload)
    if text:
        stream.times.append(now)
        stream.pieces.append(text)
    for choice in payload.get("choices") or []:
        stream.finish_reason = choice.get("finish_reason") or stream.finish_reason


async def stream_chat(client: httpx.AsyncClient, base_url: str, messages: Sequence[dict], max_tokens: int,
                      model: str = "model", stream: Optional[Stream] = None, **extra) -> Stream:
    """Sends one greedy streaming chat request and records its pieces as they arrive
    (into `stream` if given, so that a caller can watch it while it runs)."""
    body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, **extra}
    stream = stream if stream is not None else Stream(sent=0.0)
    stream.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return stream
            async for line in response.aiter_lines():
                for payload in parse_sse([line]):
                    feed(stream, payload, time.perf_counter())
    except httpx.HTTPError as e:
        stream.error = f"{type(e).__name__}: {e}"
    if not stream.times and stream.error is None:
        stream.error = "the stream carried no text"
    return stream


def count_tokens(streams: Iterable[Stream], tokenizer) -> None:
    for s in streams:
        s.tokens = len(tokenizer.encode(s.text, bos=False, eos=False)) if s.pieces else 0


def check(streams: Iterable[Stream], what: str) -> None:
    bad = [s.error for s in streams if s.error]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} request(s) failed, the first: {bad[0]}")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); NaN if empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats get 3 significant digits, NaN and None print as "-"."""
    def cell(x) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"a row has {len(row)} cells for {len(headers)} headers: {row}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_help() -> str:
    """`python -m llama serve --help` of this checkout: which flags this build has."""
    out = subprocess.run([sys.executable, "-m", "llama", "serve", "--help"], capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=120)
    return out.stdout


def has_flag(help_text: str, flag: str) -> bool:
    return any(word.strip("[],") == flag for word in help_text.split())


def ours_command(ckpt: Path, port: int, threads: int, max_seq_len: int, max_batch_size: int,
                 dtype: str = "float32", quantize: Optional[str] = None, extra: Sequence[str] = ()) -> List[str]:
    cmd = [sys.executable, "-m", "llama", "serve", "--ckpt_dir", str(ckpt), "--port", str(port), "--device", "cpu",
           "--threads", str(threads), "--max_seq_len", str(max_seq_len), "--max_batch_size", str(max_batch_size),
           "--dtype", dtype, "--shutdown_timeout", "1", "--model_name", "model"]
    if quantize:
        cmd += ["--quantize", quantize]
    return cmd + list(extra)


def llamacpp_command(gguf: Path, port: int, threads: int, n_ctx: int, draft: Optional[int] = None,
                     extra: Sequence[str] = (), extra_buffers: bool = True) -> List[str]:
    """llama-cpp-python's server. `interrupt_requests False`: by default a new request
    ends the stream that is running (its server answers one request at a time)."""
    main = ["-m", "llama_cpp.server"] if extra_buffers else ["-c", LLAMACPP_NO_EXTRA_BUFFERS]
    cmd = [sys.executable, *main, "--model", str(gguf), "--model_alias", "model",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_batch", "512",
           "--n_ubatch", "512", "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False"]
    if draft:
        cmd += ["--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", str(draft)]
    return cmd + list(extra)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@contextlib.contextmanager
def running(cmd: Sequence[str], port: int, log: Path, ready_s: float = 300.0) -> Iterator[str]:
    """Starts `cmd` (a server on 127.0.0.1:`port`), waits until /v1/models answers, yields
    its base URL, and stops it (SIGTERM, then SIGKILL after 30 s) on the way out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write(shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}) before answering; {log}:\n{_tail(log)}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {ready_s:.0f} s; {log}:\n{_tail(log)}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path, n: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def run_async(coro):
    return asyncio.run(coro)
