#!/usr/bin/env python
"""A rehearsal of serving a model split into pipeline stages over a slow
network, on one machine: each node a network namespace, joined by
benchmarks/delay_link.py (a hub that delays every packet), each running
`torchrun ... -m llama serve --pipeline_stages P` with one thread, pinned to
a core of its own where there are enough (taskset); streaming clients
(utils/bench_server.py: greedy, fixed prompts, fixed max_tokens) send 1, 4
and 8 concurrent requests to rank 0 from inside node 0's namespace. Beside
it, the same model served by one process (one node, one thread). Needs root
(ip netns, /dev/net/tun) for the staged runs.

    sudo python benchmarks/cluster_rehearsal.py --shape 1b                  # 1 node; 2 and 3 stages at 1 and 5 ms
    sudo python benchmarks/cluster_rehearsal.py --shape 8b --stages 1 2 --delays_ms 5 --clients 1 8

The model is a random int4 checkpoint (q4_1 linear layers, output q8_0,
bf16 embeddings: llama/weights/random_weights.py) of the --shape, built once
and cached under ~/.cache/llama-bench/rehearsal/<shape>-int4/, with its
stage folders (<shape>-int4-<P>-stages/, `llama shard --pipeline_stages P`)
where the disk has room; otherwise every stage maps only its layers of the
whole checkpoint, which holds the same pages in memory.

Reported per configuration and number of clients: tokens/s (completion
tokens of all requests over the wall time from the first request to the
last token), time to first token (median), and the peak resident memory
(VmHWM, read from /proc before the worker exits) of each node's worker.
Resident memory counts the checkpoint pages a worker has mapped and touched:
each stage's layers, the embedding on stage 0, the output on the last. A
table is printed and everything is written as JSON (--out).

Robustness: every process this starts is in a session of its own and is
stopped (SIGTERM, then SIGKILL) on exit, on an error and on Ctrl-C or
SIGTERM; the link removes its namespaces when stopped, and namespaces of the
same names left by a killed run are removed before a run starts.

Each staged configuration runs twice by default: with the stages taking
turns for each step of the whole batch (`--pipeline_overlap off`) and with
lanes, one group of rows per stage in flight at once (`on`); --overlap picks.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CACHE = Path.home() / ".cache" / "llama-bench" / "rehearsal"
PREFIX = "llrh"  # namespaces llrh0 .. and TUN devices llrht0 ..
MASTER_PORT = 29511  # inside the namespaces: each has its own ports
SERVE_PORT = 8011

# Llama 3.x shapes (vocabulary 128256): params.json fields as Meta's files give them.
SHAPES = {
    "8b": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 1024,
           "ffn_dim_multiplier": 1.3},  # Llama 3.1 8B: FFN 14336
    "3b": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "multiple_of": 256,
           "ffn_dim_multiplier": 1.0},  # Llama 3.2 3B: FFN 8192
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "multiple_of": 256,
           "ffn_dim_multiplier": 1.5},  # Llama 3.2 1B: FFN 8192
    "tiny": {"dim": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 2, "multiple_of": 256},  # a quick check
}
VOCAB = 128256


def log(msg: str) -> None:
    print(f"[rehearsal {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tokenizer_path() -> Path:
    from utils.fetch_llama3_tokenizer import fetch_llama3_tokenizer

    cache = Path(os.environ.get("LLAMA_TEST_CACHE") or REPO / "checkpoints")
    return fetch_llama3_tokenizer(cache / "llama3_tokenizer.model")


def complete(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def checkpoint(shape: str, seed: int = 0) -> Path:
    """The cached random int4 checkpoint of `shape`, built if missing."""
    from llama.weights.random_weights import make_random_checkpoint, random_params

    out = CACHE / f"{shape}-int4"
    if not complete(out):
        log(f"building a random int4 {shape} checkpoint in {out} (once)")
        params = random_params("llama3.1", vocab_size=VOCAB, **SHAPES[shape])
        make_random_checkpoint(out, params, tokenizer_path(), seed=seed, quantize="int4", force=True,
                               show_progress=True)
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def stage_checkpoint(whole: Path, stages: int) -> Path:
    """Stage folders for `stages` (cached), or `whole` where the disk lacks room for them."""
    from llama.weights.writer import reshard_checkpoint

    out = whole.parent / f"{whole.name}-{stages}-stages"
    if all(complete(out / f"stage{s}") for s in range(stages)):
        return out
    need = folder_bytes(whole) + (4 << 30)
    if shutil.disk_usage(whole.parent).free < need:
        log(f"{need >> 30} GiB not free for {stages} stage folders: each stage maps its layers of {whole}")
        return whole
    log(f"splitting {whole} into {stages} stage folders in {out} (once)")
    if out.exists():
        shutil.rmtree(out)
    return reshard_checkpoint(whole, out, 1, pipeline_stages=stages, progress=lambda msg: None)


class Processes:
    """Processes started here, each in a session of its own; stop() ends them all, newest first."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, timeout: float = 20.0) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()


def children(pid: int) -> list:
    """The pids of `pid`'s child processes."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def peak_bytes(pid: int) -> int:
    """VmHWM of `pid`, in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cores() -> list:
    return sorted(os.sched_getaffinity(0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(a, ckpt: Path, port: int, stages: int, overlap: str = "off") -> list:
    # max_batch_size: the most clients, rounded up to a multiple of the stages so the lanes can split it.
    rows = -(-max(a.clients) // stages) * stages
    return ["-m", "llama", "serve", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(ckpt_tokenizer(ckpt)),
            "--threads", "1", "--max_batch_size", str(rows), "--max_seq_len", str(a.max_seq_len),
            "--pipeline_stages", str(stages), "--pipeline_overlap", overlap, "--port", str(port),
            "--shutdown_timeout", "0", "--prefix_cache_mb", "0", "--max_queue", "64"]


def ckpt_tokenizer(ckpt: Path) -> Path:
    from llama.weights.stages import find_tokenizer

    return find_tokenizer(ckpt)


def in_ns(ns, cmd: list) -> list:
    return ["ip", "netns", "exec", ns, *cmd] if ns else cmd


def clients_run(a, procs: "Processes", nodes: list, ns, url: str, deadline: float) -> list:
    """Waits for the server at `url`, then runs bench_server's load for each
    number of clients, in namespace `ns` (None: here); stops at once if a
    node exits first."""
    cmd = in_ns(ns, [sys.executable, __file__, "--client", "--url", url, "--clients", *map(str, a.clients),
                     "--max_tokens", str(a.max_tokens), "--requests", str(a.requests),
                     "--ready_timeout", str(max(1, int(deadline - time.monotonic())))])
    client = procs.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    while True:
        try:
            stdout, stderr = client.communicate(timeout=1)
            break
        except subprocess.TimeoutExpired:
            check_alive(nodes, "before the clients finished")
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if client.returncode or not lines:
        raise RuntimeError(f"the clients failed ({' '.join(cmd)}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    sys.stderr.write(stderr)
    return json.loads(lines[-1][7:])


def client_main(a) -> None:
    """--client: in node 0's namespace, wait for the server, then the load for each number of clients."""
    import httpx

    from utils.bench_server import run

    deadline = time.monotonic() + a.ready_timeout
    while True:
        try:
            model = httpx.get(f"{a.url}/v1/models", timeout=5).json()["data"][0]["id"]
            break
        except (httpx.HTTPError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise SystemExit(f"the server at {a.url} did not answer within {a.ready_timeout} s")
            time.sleep(1)
    run(a.url, model, 1, 1, 4, None)  # warm-up: the first steps of a fresh engine
    results = []
    for clients in a.clients:
        results.append(run(a.url, model, clients, a.requests, a.max_tokens, None))
        print(f"  {clients} clients: {results[-1]['tokens_per_s']:.2f} tokens/s", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(results), flush=True)


def check_alive(procs: list, where: str) -> None:
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError(f"a node's process exited with status {p.returncode} {where}; its log is above")


def run_config(a, procs: Processes, whole: Path, stages: int, delay_ms: float, overlap: str = "off") -> dict:
    """One configuration: start the nodes (and the link), load them, read the workers' peaks, stop everything."""
    avail = cores()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LLAMA_SHM": "0",
           "LLAMA_DIST_TIMEOUT": str(a.dist_timeout)}
    deadline = time.monotonic() + a.load_timeout
    logs = []
    try:
        if stages == 1:
            port = free_port()
            cmd = ["taskset", "-c", str(avail[0]), sys.executable, *serve_args(a, whole, port, 1)]
            logf = open(a.logs / "node0-1stage.log", "w")
            logs.append(logf)
            nodes = [procs.start(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)]
            workers = lambda: [nodes[0].pid]  # noqa: E731
            result = clients_run(a, procs, nodes, None, f"http://127.0.0.1:{port}", deadline)
        else:
            ckpt = stage_checkpoint(whole, stages)
            link = procs.start([sys.executable, str(REPO / "benchmarks" / "delay_link.py"), "--nodes", str(stages),
                                "--delay_ms", str(delay_ms), "--prefix", PREFIX], stdout=subprocess.PIPE, text=True)
            ready = link.stdout.readline()
            if not ready.startswith("ready"):
                raise RuntimeError(f"the delayed link did not start (status {link.wait()}); run as root")
            nodes = []
            for i in range(stages):
                core = avail[i % len(avail)]
                cmd = in_ns(f"{PREFIX}{i}", ["taskset", "-c", str(core), "env", f"GLOO_SOCKET_IFNAME={PREFIX}t{i}",
                                             sys.executable, "-m", "torch.distributed.run", "--nnodes", str(stages),
                                             "--node_rank", str(i), "--nproc_per_node", "1",
                                             "--master_addr", "10.215.0.1", "--master_port", str(MASTER_PORT),
                                             *serve_args(a, ckpt, SERVE_PORT, stages, overlap)])
                logf = open(a.logs / f"node{i}-{stages}stages-{delay_ms:g}ms-overlap-{overlap}.log", "w")
                logs.append(logf)
                nodes.append(procs.start(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT))
            workers = lambda: [c for n in nodes for c in children(n.pid)]  # noqa: E731  torchrun's workers
            result = clients_run(a, procs, nodes + [link], f"{PREFIX}0", f"http://127.0.0.1:{SERVE_PORT}", deadline)
        check_alive(nodes, "before its peak memory was read")
        peaks = [peak_bytes(pid) for pid in workers()]
    except BaseException:
        for f in logs:
            f.flush()
        for f in logs:
            tail = Path(f.name).read_text(errors="replace")[-3000:]
            log(f"--- {f.name} (last lines)\n{tail}")
        raise
    finally:
        procs.stop()
        for f in logs:
            f.close()
    return {"stages": stages, "delay_ms": delay_ms if stages > 1 else 0.0, "overlap": overlap if stages > 1 else "-",
            "cores": [avail[i % len(avail)]
            for i in range(stages)], "peak_bytes": peaks, "loads": result}


def weight_bytes(ckpt: Path) -> int:
    """Bytes of weights a decoding step reads: every tensor but the embedding (one row a token)."""
    import torch

    from llama.weights.checkpoint import find_shards

    state = torch.load(find_shards(ckpt)[0], mmap=True, weights_only=True)
    return sum(t.nbytes for k, t in state.items() if k != "tok_embeddings.weight")


def decode_s(load: dict) -> float:
    """Seconds a decoding step takes with load["clients"] rows: the time after
    the (median) first token over the tokens a request gets after its first
    (the requests start together, so their steps are shared; prefill is out)."""
    per_request = load["tokens"] / max(1, load["requests"])
    return (load["seconds"] - load["ttft_p50_s"]) / max(1.0, per_request - 1)


def summary(runs: list, weights: int) -> dict:
    """The one node's decode figures at 1 and at the most clients: seconds per
    step, and the bandwidth they imply (weights read per step / step time)."""
    one = next((r for r in runs if r["stages"] == 1), None)
    if one is None:
        return {}
    loads = {x["clients"]: x for x in one["loads"]}
    out = {"weight_bytes": weights}
    if 1 in loads and loads[1]["requests"] == 1:
        step = decode_s(loads[1])
        out.update(step_1_s=step, bandwidth_bytes_per_s=weights / step)
    most = max(loads)
    if most > 1 and loads[most]["requests"] == most:
        out.update(clients_most=most, step_most_s=decode_s(loads[most]))
    return out


def table(shape: str, runs: list) -> str:
    one = next((r for r in runs if r["stages"] == 1), None)
    one_peak = max(one["peak_bytes"]) if one else None
    lines = [f"\nCluster rehearsal, {shape} int4 (random weights), 1 thread per node\n",
             f"{'nodes':>5} {'delay':>7} {'overlap':>7} {'clients':>7} {'tokens/s':>9} {'x 1 node':>8} {'TTFT p50':>9} "
             f"{'peak GB per node':>24} {'x 1 node':>8}"]
    for r in runs:
        peaks = r["peak_bytes"]
        for load in r["loads"]:
            base = next((x for x in one["loads"] if x["clients"] == load["clients"]), None) if one else None
            speed = f"{load['tokens_per_s'] / base['tokens_per_s']:.2f}" if base and base["tokens_per_s"] else "-"
            mem = f"{max(peaks) / one_peak:.2f}" if one_peak and peaks else "-"
            lines.append(f"{r['stages']:>5} {r['delay_ms']:>5g}ms {r.get('overlap', 'off'):>7} {load['clients']:>7} "
                         f"{load['tokens_per_s']:>9.2f} "
                         f"{speed:>8} {load['ttft_p50_s']:>8.2f}s {' '.join(f'{p / 1e9:.2f}' for p in peaks):>24} "
                         f"{mem:>8}")
    return "\n".join(lines)


LLAMA_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "multiple_of": 4096,
             "ffn_dim_multiplier": 1.3}  # Llama 3.1 70B: FFN 28672


def stored_int4(config: dict) -> tuple:
    """(bytes a decoding step reads, parameters it multiplies by) of `config`
    stored as random_weights writes int4: q4_1 layers, q8_0 output, embedding not read."""
    from llama.weights import quantized
    from llama.weights.args import ModelArgs
    from llama.weights.random_weights import quantized_types, random_params
    from llama.weights.schema import model_weights

    args = ModelArgs.from_params(random_params("llama3.1", vocab_size=VOCAB, **config))
    types, nbytes, params = quantized_types(args, "int4"), 0, 0
    for name, w in model_weights(args).items():
        if name in types:
            wt, st = quantized.empty_stored(types[name], *w.shape)
            nbytes, params = nbytes + wt.nbytes + st.nbytes, params + w.shape[0] * w.shape[1]
    return nbytes, params


def predict(s: dict, shape: str, config: dict = LLAMA_70B, nodes=(3, 4), links_gbit=(1, 10), latency_ms: float = 0.1,
            rows: int = 8) -> str:
    """The model of docs/distributed.md (#what-the-rehearsal-predicts) fed with this shape's one-node figures:
    step(b) = R + b K on one node (R the weight reads, K a row's compute, from 1 and `rows` clients), scaled to
    `config` by its bytes (R) and parameters (K); P stages add P hops of latency + b dim 2 bytes / link rate."""
    if "step_most_s" not in s or s.get("clients_most") != rows:
        return ""
    w_meas, p_meas = stored_int4(SHAPES[shape])
    w_big, p_big = stored_int4(config)
    k = max(0.0, (s["step_most_s"] - s["step_1_s"]) / (rows - 1))
    r = s["step_1_s"] - k
    r_big, k_big = r * w_big / w_meas, k * p_big / p_meas
    lines = [f"\nPredicted (model of docs/distributed.md), Llama 3.1 70B int4 as stored here: {w_big / 1e9:.1f} GB read "
             f"a step; from {shape}: weight reads {r * 1000:.1f} ms ({s['weight_bytes'] / r / 1e9:.1f} GB/s), a row's "
             f"compute {k * 1000:.1f} ms -> 70B: {r_big:.2f} s + {k_big:.2f} s a row; link latency {latency_ms} ms",
             f"{'nodes':>5} {'link':>7} {'GB/node':>8} {'s/token b=1':>12} {'of it network':>14} "
             f"{f'tok/s b={rows} today':>16} "
             f"{f'tok/s b={rows} overlapped':>21}"]
    for p in nodes:
        for gbit in links_gbit:
            def hops(b):
                return p * (latency_ms / 1000 + b * config["dim"] * 2 * 8 / (gbit * 1e9))
            one = r_big + k_big + hops(1)
            today = rows / (r_big + rows * k_big + hops(rows))
            overlapped = rows / (r_big + rows * k_big / p + hops(rows / p))
            lines.append(f"{p:>5} {gbit:>4} GbE {w_big / p / 1e9:>8.1f} {one:>12.2f} {hops(1) * 1000:>11.2f} ms {today:>16.2f} {overlapped:>21.2f}")
    return "\n".join(lines)


def summary_text(s: dict) -> str:
    if "bandwidth_bytes_per_s" not in s:
        return ""
    text = (f"\none node, 1 client: {s['step_1_s'] * 1000:.1f} ms a decoded token, {s['weight_bytes'] / 1e9:.2f} GB "
            f"of weights read each: {s['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    if "step_most_s" in s:
        text += f"; {s['clients_most']} clients: {s['step_most_s'] * 1000:.1f} ms a step"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="configurations: 1 = one node")
    p.add_argument("--delays_ms", type=float, nargs="+", default=[1.0, 5.0], help="one-way link delays")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--overlap", nargs="+", choices=["on", "off"], default=["off", "on"],
                   help="the staged runs with the stages taking turns (off) and with lanes (on: "
                        "--pipeline_overlap, docs/distributed.md); both by default")
    p.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--load_timeout", type=float, default=900, help="seconds for a configuration's load and clients")
    p.add_argument("--dist_timeout", type=float, default=600, help="LLAMA_DIST_TIMEOUT of the nodes")
    p.add_argument("--out", type=Path, help="JSON results (default: <cache>/<shape>-results.json)")
    p.add_argument("--report", action="store_true", help="print the table of the JSON results (--out) again; run nothing")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--ready_timeout", type=float, default=600, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        return client_main(a)
    out = a.out or CACHE / f"{a.shape}-results.json"
    if a.report:
        saved = json.loads(out.read_text())
        facts = summary(saved["runs"], weight_bytes(CACHE / f"{saved['shape']}-int4"))
        print(table(saved["shape"], saved["runs"]) + summary_text(facts) + predict(facts, saved["shape"]))
        return
    if any(s < 1 for s in a.stages) or any(c < 1 for c in a.clients) or any(d < 0 for d in a.delays_ms):
        p.error("--stages and --clients must be 1 or more, --delays_ms 0 or more")
    if any(s > 1 for s in a.stages) and os.geteuid() != 0:
        p.error("the staged runs make network namespaces: run as root (or pass --stages 1)")
    too_many = [s for s in a.stages if s > SHAPES[a.shape]["n_layers"]]
    if too_many:
        p.error(f"--shape {a.shape} has {SHAPES[a.shape]['n_layers']} layers: cannot make {too_many[0]} stages")
    procs = Processes()

    def interrupted(signum, _frame):
        procs.stop(timeout=5)
        raise SystemExit(f"stopped by signal {signum}; every process started here was stopped")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    a.logs = CACHE / "logs" / a.shape
    a.logs.mkdir(parents=True, exist_ok=True)
    whole = checkpoint(a.shape)
    runs = []
    try:
        for stages in sorted(set(a.stages)):
            for delay, overlap in ([(0.0, "-")] if stages == 1 else
                                   [(d, o) for d in a.delays_ms for o in a.overlap]):
                log(f"{stages} node(s)" + (f", {delay:g} ms links, overlap {overlap}" if stages > 1 else ""))
                runs.append(run_config(a, procs, whole, stages, delay, overlap))
                out.write_text(json.dumps({"shape": a.shape, "config": SHAPES[a.shape], "args": {
                    k: v for k, v in vars(a).items() if k in ("clients", "requests", "max_tokens", "max_seq_len")},
                    "cpu_count": os.cpu_count(), "runs": runs}, indent=1))
    finally:
        procs.stop(timeout=5)
    facts = summary(runs, weight_bytes(whole))
    out.write_text(json.dumps({**json.loads(out.read_text()), "summary": facts}, indent=1))
    print(table(a.shape, runs) + summary_text(facts) + predict(facts, a.shape))
    print(f"\nJSON: {out}; node logs: {a.logs}")


if __name__ == "__main__":
    main()
