"""Our server beside llama-cpp-python's server on the same weights, in one run
(issue 25): a growing multi-turn chat, 16 concurrent clients with a shared
system prompt and one long document, and speculative decoding at batch 1.

    python benchmarks/server_benchmark.py multiturn --threads 2 --rounds 3
    python benchmarks/server_benchmark.py concurrent --threads 2 --rounds 2 --json concurrent.json
    python benchmarks/server_benchmark.py speculative --threads 2 --rounds 3
    python benchmarks/server_benchmark.py all --servers ours      # without llama.cpp

Both servers are started here, one after the other, on free ports, with the
same threads (ours --threads, llama.cpp n_threads and n_threads_batch) and
are sent the same greedy streaming /v1/chat/completions requests through
httpx (benchmarks/server_client.py); TTFT, inter-token gaps and decode rates
come from the arrival times of the SSE chunks. Like with like: --pair fp32
(default) serves our float32 checkpoint against the same weights as an F32
GGUF; --pair int4 our --quantize int4 against llama.cpp's Q4_1 made from
that F32 file by its own quantizer (benchmarks/llamacpp_peer.peer_files,
cached under ~/.cache/llama-bench).

What llama-cpp-python's server is (0.3.x, llama_cpp/server/app.py): one
llama_cpp.Llama behind a global lock, so it runs one request at a time (no
parallel slots, unlike llama.cpp's C++ llama-server); concurrent clients
queue. By default a new request interrupts the running stream
(interrupt_requests), which is switched off here. Every request reuses the
longest common token prefix with the previous one's KV cache (Llama.generate),
so a single conversation's earlier turns are not prefilled again even without
its --cache option (a RAM cache of saved states, off here unless passed with
--llamacpp_args). Speculation: --draft_model prompt-lookup-decoding
(LlamaPromptLookupDecoding). Ours: the prefix cache is on by default;
`--speculate ngram` is passed when `llama serve --help` lists it.

Parts:
- multiturn: a 10-turn conversation growing to about 1,500 prompt tokens
  (user turns from benchmarks/data, scripted assistant replies so both servers
  see the same prompts); TTFT per turn, median over rounds (each round a new
  conversation). Goal: turn 10 <= 1.5x turn 1, ours <= llama.cpp's.
- concurrent: 16 clients at once: --shared_clients of them with a
  --system_tokens shared system prompt, the others short prompts; once the
  first stream has its first tokens, one client sends a --document_tokens
  document. Throughput, p50/p99 TTFT, the median gap between tokens of the
  running streams and the p99 of the gaps that overlap the document's
  admission (sent to first token). Goal: that p99 <= 3x the median.
- speculative: batch 1, greedy; an input-grounded task (repeat a given
  passage) and free chat; decode tokens/s of plain and speculative decoding,
  and whether the speculative text equals the plain one. Goal: >= 1.5x plain
  on the grounded task, >= 0.95x on free chat.
"""

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.server_client import (Stream, check, count_tokens, free_port, has_flag, llamacpp_command,  # noqa: E402
                                      markdown_table, median, ours_command, percentile, running, serve_help,
                                      stream_chat)

TEXT = REPO / "benchmarks" / "data" / "pride_and_prejudice_ch1.txt"
PAIRS = {"fp32": (("float32", None), "F32"), "int4": (("float32", "int4"), "Q4_1")}
GROUNDED_PROMPT = "Repeat the following passage word for word, and nothing else.\n\n{passage}"
FREE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
HTTP_TIMEOUT = httpx.Timeout(600.0, connect=30.0)


# ---------------------------------------------------------------- workloads (pure)

def words() -> List[str]:
    return TEXT.read_text(encoding="utf-8").split()


def take_words(source: Sequence[str], start: int, n: int) -> str:
    """`n` words of `source` from `start`, wrapping around."""
    return " ".join(source[(start + i) % len(source)] for i in range(n))


def text_of_tokens(count: Callable[[str], int], tokens: int, start: int = 0) -> str:
    """Text of the novel (wrapping around) of about `tokens` tokens by `count`."""
    source = words()
    per_word = count(" ".join(source)) / len(source)
    n = max(1, int(tokens / per_word))
    text = take_words(source, start, n)
    while count(text) > tokens and n > 1:  # the estimate may overshoot a little
        n = max(1, n - max(1, n // 50))
        text = take_words(source, start, n)
    return text


def conversation(count: Callable[[str], int], turns: int = 10, target_tokens: int = 1500, reply_words: int = 24,
                 tag: int = 0) -> dict:
    """A scripted chat: {"system": str, "turns": [(user, assistant reply), ...]}.

    Turn k's prompt is the system message, every earlier (user, reply) pair and
    user k; the user turns are consecutive passages of the novel sized so that
    the last prompt is about `target_tokens` tokens (by `count`, plus a few
    template tokens per message). `tag` makes conversations of different
    rounds differ from their first tokens, so no cache carries over."""
    source = words()
    per_word = count(" ".join(source)) / len(source)
    system = f"Conversation {tag}. You are a helpful assistant reading a novel with the user; answer briefly."
    overhead = 5  # <|im_start|>role\n ... <|im_end|>\n
    reply_tokens = reply_words * per_word + overhead
    user_tokens = (target_tokens - count(system) - overhead) / turns - reply_tokens - overhead - 3
    if user_tokens < 8:
        raise ValueError(f"--target_tokens {target_tokens} is too small for {turns} turns: "
                         "give at least 60 tokens a turn")
    n_user = max(1, int(user_tokens / per_word))
    pairs, at = [], tag * 97  # rounds start at different places of the text too
    for k in range(turns):
        user = f"Part {k + 1}: " + take_words(source, at, n_user) + "\nWhat happens in this part?"
        at += n_user
        reply = f"In part {k + 1}, " + take_words(source, at + 7 * k, reply_words)
        pairs.append((user, reply))
    return {"system": system, "turns": pairs}


def turn_messages(conv: dict, k: int) -> List[dict]:
    """The messages of turn k (0-based): system, the earlier turns with their replies, user k."""
    messages = [{"role": "system", "content": conv["system"]}]
    for user, reply in conv["turns"][:k]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": conv["turns"][k][0]}]


def window_gaps(streams, start: float, end: float) -> List[float]:
    """Gaps between tokens of `streams` whose interval overlaps [start, end]."""
    return [gap for s in streams for t, gap in s.gaps() if t > start and t - gap < end]


def concurrent_figures(streams, document) -> dict:
    """The figures of one concurrent round: `streams` the running ones, `document` the long prompt's."""
    every = list(streams) + [document]
    first_sent, last_done = min(s.sent for s in every), max(s.done for s in every)
    gaps = [gap for s in streams for _, gap in s.gaps()]
    admission = window_gaps(streams, document.sent, document.times[0])
    itl_median = median(gaps)
    itl_p99_admission = percentile(admission, 99)
    return {
        "tokens": sum(s.tokens for s in every),
        "tokens_per_s": sum(s.tokens for s in every) / (last_done - first_sent),
        "ttft_p50_s": median([s.ttft for s in every]),
        "ttft_p99_s": percentile([s.ttft for s in every], 99),
        "document_ttft_s": document.ttft,
        "itl_median_s": itl_median,
        "itl_p99_admission_s": itl_p99_admission,
        "admission_gaps": len(admission),
        "p99_over_median": itl_p99_admission / itl_median if admission else float("nan"),
    }


def medians_of(rounds: Sequence[dict]) -> dict:
    return {k: median([r[k] for r in rounds]) for k in rounds[0]}


# ---------------------------------------------------------------- servers

class Servers:
    """How to start each side: ours from the checkpoint, llama.cpp from the GGUF of the same weights."""

    def __init__(self, a):
        from llama.text.tokenizer import Tokenizer

        self.a = a
        self.ckpt = Path(a.ckpt_dir)
        self.tokenizer = Tokenizer.from_file(self.ckpt / "tokenizer.model")
        (self.dtype, self.quantize), self.gguf_kind = PAIRS[a.pair]
        self.help = serve_help()
        self.logs = Path(a.logs)
        self.gguf: Optional[Path] = None
        if "llama.cpp" in a.servers:
            from benchmarks.llamacpp_peer import peer_files

            kinds = () if self.gguf_kind == "F32" else (self.gguf_kind,)
            self.gguf = peer_files(self.ckpt, a.gguf, threads=a.threads, kinds=kinds)[self.gguf_kind]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False, eos=False))

    def ours(self, max_seq_len: int, max_batch_size: int, extra: Sequence[str] = ()):
        port = free_port()
        cmd = ours_command(self.ckpt, port, self.a.threads, max_seq_len, max_batch_size, self.dtype, self.quantize,
                           [*shlex.split(self.a.ours_args), *extra])
        return running(cmd, port, self.logs / f"ours-{port}.log")

    def llamacpp(self, n_ctx: int, draft: Optional[int] = None):
        port = free_port()
        cmd = llamacpp_command(self.gguf, port, self.a.threads, n_ctx, draft, shlex.split(self.a.llamacpp_args),
                               extra_buffers=not self.a.llamacpp_no_extra_buffers)
        return running(cmd, port, self.logs / f"llamacpp-{port}.log")

    def describe(self) -> str:
        ours = f"ours {self.dtype}" + (f" --quantize {self.quantize}" if self.quantize else "")
        return f"{ours} vs llama.cpp {self.gguf_kind} ({self.gguf.name if self.gguf else 'not run'})"


async def _warm(client, url: str) -> None:
    check([await stream_chat(client, url, [{"role": "user", "content": "Hello!"}], 8)], "warm-up")


async def _multiturn(url: str, conversations: Sequence[dict], max_tokens: int) -> List[List[float]]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        await _warm(client, url)
        out = []
        for conv in conversations:
            ttfts = []
            for k in range(len(conv["turns"])):
                s = await stream_chat(client, url, turn_messages(conv, k), max_tokens)
                check([s], f"turn {k + 1}")
                ttfts.append(s.ttft)
            out.append(ttfts)
        return out


def multiturn(servers: Servers, a) -> dict:
    conversations = [conversation(servers.count, a.turns, a.target_tokens, tag=r) for r in range(a.rounds)]
    from llama.text.chat_format import ChatFormat

    fmt = ChatFormat.for_tokenizer(servers.tokenizer)
    prompt_tokens = [len(fmt.encode_dialog_prompt(turn_messages(conversations[0], k))) for k in range(a.turns)]
    n_ctx = prompt_tokens[-1] + a.reply_tokens + 256
    res = {"prompt_tokens": prompt_tokens, "ttft_s": {}}
    for name in a.servers:
        start = servers.ours(n_ctx, 4) if name == "ours" else servers.llamacpp(n_ctx)
        with start as url:
            rounds = asyncio.run(_multiturn(url, conversations, a.reply_tokens))
        res["ttft_s"][name] = [median([r[k] for r in rounds]) for k in range(a.turns)]
    headers = ["turn", "prompt tokens"] + [f"{n} TTFT ms" for n in a.servers]
    rows = [[k + 1, prompt_tokens[k], *(1e3 * res["ttft_s"][n][k] for n in a.servers)] for k in range(a.turns)]
    rows.append(["turn N / turn 1", "", *(res["ttft_s"][n][-1] / res["ttft_s"][n][0] for n in a.servers)])
    if len(a.servers) == 2:
        headers.append("ours / llama.cpp")
        for k, row in enumerate(rows[:-1]):
            row.append(res["ttft_s"]["ours"][k] / res["ttft_s"]["llama.cpp"][k])
        rows[-1].append("")
    print(f"\n## multiturn: TTFT per turn, {servers.describe()}, median of {a.rounds} conversations "
          f"(goal: turn {a.turns} <= 1.5x turn 1; ours <= llama.cpp)")
    print(markdown_table(headers, rows), flush=True)
    return res


def concurrent_requests(servers: Servers, a, r: int):
    """(the running clients' messages, the document's messages) of round r."""
    system = text_of_tokens(servers.count, a.system_tokens)
    shared = f"You are an assistant for the novel below; answer in a few sentences.\n\n{system}"
    clients = []
    for i in range(a.clients - 1):
        question = f"Round {r}, question {i}: describe the character of someone in a story, in your own words."
        if i < a.shared_clients:
            clients.append([{"role": "system", "content": shared}, {"role": "user", "content": question}])
        else:
            clients.append([{"role": "system", "content": f"Client {i} of round {r}."},
                            {"role": "user", "content": question}])
    doc = text_of_tokens(servers.count, a.document_tokens, start=1000 * r + 13)
    document = [{"role": "user", "content": f"Document {r}:\n\n{doc}\n\nSummarise this document."}]
    return clients, document


async def _concurrent_round(url: str, clients, document, a) -> dict:
    limits = httpx.Limits(max_connections=a.clients + 4)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as client:
        live = [Stream(sent=0.0) for _ in clients]
        tasks = [asyncio.create_task(stream_chat(client, url, m, a.gen_tokens, stream=s)) for m, s in zip(clients, live)]
        # The document arrives while the others stream: once any stream has a few tokens.
        started = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            if any(len(s.times) >= a.document_after for s in live) or all(t.done() for t in tasks):
                break
            if time.perf_counter() - started > 600:
                raise RuntimeError("no stream produced tokens within 600 s")
        doc = await stream_chat(client, url, document, a.gen_tokens)
        streams = await asyncio.gather(*tasks)
    return {"streams": streams, "document": doc}


def concurrent(servers: Servers, a) -> dict:
    rounds_requests = [concurrent_requests(servers, a, r) for r in range(a.rounds)]
    need = max(servers.count(json.dumps(m)) for clients, doc in rounds_requests for m in [*clients, doc])
    n_ctx = need + a.gen_tokens + 64
    res = {}
    for name in a.servers:
        start = servers.ours(n_ctx, a.clients) if name == "ours" else servers.llamacpp(n_ctx)
        rounds = []
        with start as url:
            asyncio.run(_warm_only(url))
            for clients, document in rounds_requests:
                got = asyncio.run(_concurrent_round(url, clients, document, a))
                check([*got["streams"], got["document"]], f"concurrent round on {name}")
                count_tokens([*got["streams"], got["document"]], servers.tokenizer)
                rounds.append(concurrent_figures(got["streams"], got["document"]))
        res[name] = {"median": medians_of(rounds), "rounds": rounds}
    keys = [("tokens_per_s", "throughput tok/s", 1), ("ttft_p50_s", "TTFT p50 ms", 1e3),
            ("ttft_p99_s", "TTFT p99 ms", 1e3), ("document_ttft_s", "document TTFT ms", 1e3),
            ("itl_median_s", "ITL median ms", 1e3), ("itl_p99_admission_s", "ITL p99 during admission ms", 1e3),
            ("p99_over_median", "p99 / median (goal <= 3)", 1)]
    rows = [[label, *(scale * res[n]["median"][k] for n in a.servers)] for k, label, scale in keys]
    print(f"\n## concurrent: {a.clients} clients ({a.shared_clients} with a {a.system_tokens}-token shared system "
          f"prompt, one {a.document_tokens}-token document), {a.gen_tokens} tokens each, {servers.describe()}, "
          f"median of {a.rounds} rounds")
    print(markdown_table(["figure", *a.servers], rows), flush=True)
    return res


async def _warm_only(url: str) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        await _warm(client, url)


async def _speculative(url: str, tasks: Dict[str, List[dict]], rounds: int, max_tokens: int) -> Dict[str, list]:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
        await _warm(client, url)
        out = {task: [] for task in tasks}
        for _ in range(rounds):
            for task, messages in tasks.items():
                s = await stream_chat(client, url, messages, max_tokens)
                check([s], task)
                out[task].append(s)
        return out


def speculative(servers: Servers, a) -> dict:
    passage = text_of_tokens(servers.count, a.passage_tokens)
    tasks = {"grounded": [{"role": "user", "content": GROUNDED_PROMPT.format(passage=passage)}],
             "free chat": [{"role": "user", "content": FREE_PROMPT}]}
    n_ctx = servers.count(passage) + a.spec_tokens + 128
    spec_flags = None
    if has_flag(servers.help, "--speculate"):
        spec_flags = ["--speculate", "ngram"]
        if has_flag(servers.help, "--speculate_tokens"):
            spec_flags += ["--speculate_tokens", str(a.draft)]
    configs = []
    if "ours" in a.servers:
        configs += [("ours", "plain", lambda: servers.ours(n_ctx, 1))]
        if spec_flags:
            configs += [("ours", "ngram", lambda: servers.ours(n_ctx, 1, spec_flags))]
    if "llama.cpp" in a.servers:
        configs += [("llama.cpp", "plain", lambda: servers.llamacpp(n_ctx)),
                    ("llama.cpp", "prompt lookup", lambda: servers.llamacpp(n_ctx, a.draft))]
    res = {"ours_speculation": "--speculate ngram" if spec_flags else "not available in this build", "runs": {}}
    for name, mode, start in configs:
        with start() as url:
            got = asyncio.run(_speculative(url, tasks, a.rounds, a.spec_tokens))
        for task, streams in got.items():
            count_tokens(streams, servers.tokenizer)
            res["runs"][f"{name} {mode} {task}"] = {
                "server": name, "mode": mode, "task": task, "tokens": streams[0].tokens, "text": streams[0].text,
                "decode_tokens_per_s": median([s.decode_tokens_per_s() for s in streams]),
                "e2e_tokens_per_s": median([s.tokens / (s.done - s.sent) for s in streams])}
    rows = []
    for key, run in res["runs"].items():
        plain = res["runs"][f"{run['server']} plain {run['task']}"]
        rows.append([run["server"], run["mode"], run["task"], run["tokens"], run["decode_tokens_per_s"],
                     run["e2e_tokens_per_s"], run["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                     "yes" if run["text"] == plain["text"] else "no"])
    print(f"\n## speculative: batch 1, greedy, up to {a.spec_tokens} tokens, {servers.describe()}, median of "
          f"{a.rounds}; ours: {res['ours_speculation']} (goal: >= 1.5x plain grounded, >= 0.95x free chat)")
    print(markdown_table(["server", "decoding", "task", "tokens", "decode tok/s", "end-to-end tok/s", "vs plain",
                          "same text as plain"], rows), flush=True)
    return res


def machine() -> dict:
    import os

    from llama.common.cpu import cpu_flags, cpuinfo_text

    flags = cpu_flags() or frozenset()
    names = [line.partition(":")[2].strip() for line in (cpuinfo_text() or "").splitlines()
             if line.startswith("model name")]
    info = {"cpu": names[0] if names else None, "flags": " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))),
            "cores": len(os.sched_getaffinity(0)), "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    try:
        import llama_cpp
        info["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        pass
    return info


PARTS = {"multiturn": multiturn, "concurrent": concurrent, "speculative": speculative}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=[*PARTS, "all"])
    ap.add_argument("--ckpt_dir", default=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--gguf", default=str(REPO / "checkpoints" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                    help="a GGUF of the checkpoint's vocabulary: the tokenizer of the F32 GGUF written for llama.cpp")
    ap.add_argument("--pair", choices=list(PAIRS), default="fp32",
                    help="fp32: our float32 vs llama.cpp F32; int4: our --quantize int4 vs llama.cpp Q4_1")
    ap.add_argument("--servers", nargs="+", choices=["ours", "llama.cpp"], default=["ours", "llama.cpp"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--logs", default=str(Path.home() / ".cache" / "llama-bench" / "server-logs"))
    ap.add_argument("--ours_args", default="", help="more flags for `llama serve` (e.g. '--prefill_chunk 256')")
    ap.add_argument("--llamacpp_no_extra_buffers", action="store_true",
                    help="load llama.cpp's weights without its AMX / repacked buffers (needed for Q8_0 on AMX CPUs; "
                         "F32 prefill is many times slower without them)")
    ap.add_argument("--llamacpp_args", default="", help="more flags for llama_cpp.server (e.g. '--cache True')")
    g = ap.add_argument_group("multiturn")
    g.add_argument("--turns", type=int, default=10)
    g.add_argument("--target_tokens", type=int, default=1500)
    g.add_argument("--reply_tokens", type=int, default=16, help="tokens generated each turn")
    g = ap.add_argument_group("concurrent")
    g.add_argument("--clients", type=int, default=16)
    g.add_argument("--shared_clients", type=int, default=8)
    g.add_argument("--system_tokens", type=int, default=2000)
    g.add_argument("--document_tokens", type=int, default=4000)
    g.add_argument("--gen_tokens", type=int, default=64)
    g.add_argument("--document_after", type=int, default=4,
                   help="send the document once a stream has this many tokens")
    g = ap.add_argument_group("speculative")
    g.add_argument("--passage_tokens", type=int, default=200)
    g.add_argument("--spec_tokens", type=int, default=200)
    g.add_argument("--draft", type=int, default=10, help="tokens drafted a step (both servers)")
    a = ap.parse_args(argv)
    if a.clients < 2 or not 0 <= a.shared_clients <= a.clients - 1:
        ap.error(f"--clients must be 2 or more and --shared_clients 0..clients-1, got {a.clients}, {a.shared_clients}")
    if min(a.rounds, a.turns, a.threads, a.gen_tokens, a.spec_tokens) < 1:
        ap.error("--rounds, --turns, --threads, --gen_tokens and --spec_tokens must be 1 or more")
    if not (Path(a.ckpt_dir) / "params.json").is_file():
        ap.error(f"--ckpt_dir {a.ckpt_dir} has no params.json: give a Meta-format checkpoint "
                 "(quickstart.sh puts SmolLM2-135M-Instruct in checkpoints/)")
    if "llama.cpp" in a.servers and not Path(a.gguf).is_file():
        ap.error(f"--gguf {a.gguf} does not exist: llama.cpp needs a GGUF of the same vocabulary "
                 "(or run --servers ours)")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    servers = Servers(a)
    info = machine()
    print(f"# Serving beside llama.cpp's server: {info}")
    res = {"machine": info, "args": vars(a)}
    for part in PARTS if a.part == "all" else [a.part]:
        res[part] = PARTS[part](servers, a)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
