"""Load test of a running `llama serve`: total tokens/s and time to first token
with 1, 4, 8, 16 ... concurrent streaming clients.

    llama serve --ckpt_dir checkpoints/SmolLM2-135M-Instruct --max_batch_size 16 --threads 2 &
    python utils/bench_server.py --url http://127.0.0.1:8000 --clients 1 4 8 16

Each client sends `--requests` chat requests one after another (streaming,
greedy, prompts of different lengths, `--max_tokens` each); "1 client" is
the sequential baseline. Tokens are counted from the usage the server
reports (stream_options.include_usage). Needs httpx (the server extra's test
tools).
"""

import argparse
import json
import statistics
import threading
import time

import httpx

PROMPTS = ["Hi", "Why is the sky blue?", "Write a short poem about the sea and the wind.",
           "List three fruits.", "Explain what a transformer is in two sentences, for a child.",
           "What is 12 times 7?", "Tell me a story about a brave little mouse who lived in a library.",
           "Say hello in French."]


def one_request(client, url, model, prompt, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - start, tokens


def run(url, model, clients, requests, max_tokens, api_key):
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ttfts, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client_loop(c):
        with httpx.Client(timeout=600, headers=headers) as client:
            for k in range(requests):
                prompt = PROMPTS[(c * requests + k) % len(PROMPTS)]
                try:
                    t, n = one_request(client, url, model, prompt, max_tokens)
                except httpx.HTTPError as e:
                    errors.append(str(e))
                    continue
                with lock:
                    ttfts.append(t)
                    tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))] if ttfts else float("nan")
    return {"clients": clients, "requests": len(ttfts), "errors": len(errors), "tokens": tokens[0],
            "seconds": wall, "tokens_per_s": tokens[0] / wall,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p99_s": p99}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: the server's only model)")
    p.add_argument("--api_key")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max_tokens", type=int, default=32)
    a = p.parse_args()
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    model = a.model or httpx.get(f"{a.url}/v1/models", headers=headers).json()["data"][0]["id"]
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9}")
    for clients in a.clients:
        r = run(a.url, model, clients, a.requests, a.max_tokens, a.api_key)
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s", flush=True)


if __name__ == "__main__":
    main()
