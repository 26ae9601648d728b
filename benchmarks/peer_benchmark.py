"""Ours beside llama.cpp and transformers on the same weights, in one run.

    python benchmarks/benchmark.py --peer llama.cpp       # the same as this script
    python benchmarks/peer_benchmark.py --threads 2 --rounds 3 --json peer.json

Runs the quick start's SmolLM2-135M-Instruct (checkpoints/, any Meta
checkpoint with a GGUF of its vocabulary works: --ckpt_dir, --gguf). llama.cpp
gets the same weights: the checkpoint written as an F32 GGUF, and BF16, Q8_0
and Q4_1 made from it by llama.cpp's own quantizer (benchmarks/llamacpp_peer.py,
cached under ~/.cache/llama-bench). Batch 1, greedy, stop tokens off, every
engine with the same number of threads.

First checks that llama.cpp F32 and our fp32 produce the same greedy tokens
for the prompt (and says how many agree), then times, in each of --rounds
interleaved rounds, decode (ms per token after the first, 32-token prompt, 128
new tokens) and prefill (time to the first token of a 512-token prompt) of:
ours fp32 / bf16 / int8 / int4 (Llama.build + generate, the public API)
against llama.cpp F32 / BF16 / Q8_0 / Q4_1 (its own counters), and
transformers fp32 / bf16 (benchmarks/hf_reference.py). Prints the medians as
a Markdown table with ratios, then the int8 and int4 quality reports
(benchmarks/quant_quality.py) and the same reports of llama.cpp's Q8_0 and
Q4_1 against its BF16 and F32, on the same tokens.
"""

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.peer_report import PAIRS, medians, report  # noqa: E402
from benchmarks.quant_quality import TEXT, build, quantization_quality  # noqa: E402
from llama.text.tokenizer import Tokenizer  # noqa: E402

OUR_BUILDS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
              "int4": ("bfloat16", "int4")}
QUANTIZED = {"int8": "Q8_0", "int4": "Q4_1"}  # ours -> llama.cpp's file type of the same bits, for the quality reports
PAUSE_S = 0.2  # between engines: the previous one's idle worker threads stop spinning


QUALITY_POSITIONS = 512  # next-token predictions in the quality reports


def our_builds() -> dict:
    """OUR_BUILDS that run here: int4 only on our kernels (llama/kernels/native.py)."""
    from llama.kernels import native

    return {k: v for k, v in OUR_BUILDS.items() if v[1] != "int4" or native.library() is not None}


def machine(with_llama_cpp: bool) -> dict:
    """CPU model and flags, cores, library versions, load."""
    info = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and "cpu" not in info:
                info["cpu"] = value.strip()
            if key.strip() == "flags" and "flags" not in info:
                info["flags"] = value.split()
    info["torch"] = torch.__version__
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["onednn_bf16"] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if with_llama_cpp:
        from benchmarks.llamacpp_peer import system_info, version
        info["llama_cpp"], info["llama_cpp_system"] = version(), system_info()
    if hasattr(os, "getloadavg"):
        info["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return info


def ours_decode(gen, prompt, n: int) -> dict:
    metrics = gen.generate([prompt], n, temperature=0).metrics
    return {"decode_ms": 1e3 / metrics.decode_tokens_per_s}


def ours_prefill(gen, prompt) -> dict:
    return {"prefill_ms": 1e3 * gen.generate([prompt], 1, temperature=0).metrics.first_token_seconds}


def _hf_cache(model, out) -> tuple:
    """(keyword, cache): transformers 5.24 renamed past_key_values to cache (the old name warns)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return "cache", out.cache
    return "past_key_values", out.past_key_values


@torch.inference_mode()
def hf_decode(model, prompt, n: int) -> dict:
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    (key, cache), token = _hf_cache(model, out), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(n - 1):
        out = model(token, use_cache=True, **{key: cache})
        (key, cache), token = _hf_cache(model, out), out.logits[:, -1:].argmax(-1)
    return {"decode_ms": 1e3 * (time.perf_counter() - start) / (n - 1)}


@torch.inference_mode()
def hf_prefill(model, prompt) -> dict:
    start = time.perf_counter()
    model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits.argmax(-1)
    return {"prefill_ms": 1e3 * (time.perf_counter() - start)}


def greedy_check(gen, runner, prompt, n: int, text: str) -> dict:
    ours = gen.generate([prompt], n, temperature=0)[0][0]
    theirs = runner.greedy(prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"prompt_len": len(prompt), "total": n, "same_prefix": same,
            "same_positions": sum(a == b for a, b in zip(ours, theirs)),
            "prompt_tokens_same": runner.tokenize(text) == gen.tokenizer.encode(text, bos=False, eos=False),
            "ours": ours, "llama.cpp": theirs}


def measure(engines: dict, a, prompt, long_prompt) -> dict:
    """Median decode and prefill figures of every engine over interleaved rounds."""
    rounds = {key: [] for key in engines}
    for i in range(a.rounds):
        for key, (decode, prefill) in engines.items():
            figures = decode(prompt, a.gen_len)
            time.sleep(PAUSE_S)
            figures.update(prefill(long_prompt))
            time.sleep(PAUSE_S)
            rounds[key].append(figures)
        done = ", ".join(f"{e} {p} {v[-1]['decode_ms']:.1f}/{v[-1]['prefill_ms']:.0f}" for (e, p), v in rounds.items())
        print(f"  round {i + 1} of {a.rounds} (decode ms/token / prefill ms): {done}", file=sys.stderr, flush=True)
    speed: dict = {}
    for (engine, precision), values in rounds.items():
        speed.setdefault(engine, {})[precision] = medians(values)
    return speed


def engines_to_time(a, ckpt: Path, prompt, long_prompt, res: dict) -> dict:
    """(engine, precision) -> (decode, prefill) callables, in the interleaving order: each of
    ours beside llama.cpp's file of the same weights, then transformers. Fills res['greedy']."""
    seq = max(a.prompt_len + a.gen_len, a.prefill_len + 1) + 8
    ours, compiled = {}, {}
    for name, (dtype, quant) in our_builds().items():
        gen = build(ckpt, dtype, quant, seq, a.threads)
        gen.tokenizer.stop_tokens = frozenset()  # every run generates its full length
        ours[name] = gen
        if a.compile:  # the same model with compiled decoding (llama/kernels/compiled.py)
            compiled[name] = build(ckpt, dtype, quant, seq, a.threads, compile=True)
            compiled[name].tokenizer.stop_tokens = frozenset()
    theirs = {}
    if "llama.cpp" not in a.skip:
        from benchmarks.llamacpp_peer import LlamaCppRunner, peer_files

        files = peer_files(ckpt, a.gguf, a.threads, log=lambda m: print(m, file=sys.stderr))
        theirs = {kind: LlamaCppRunner(files[kind], a.threads, n_ctx=seq) for _, kind in PAIRS}
        res["greedy"] = greedy_check(ours["fp32"], theirs["F32"], prompt, a.gen_len, TEXT.read_text(encoding="utf-8"))
    engines = {}
    for mine, kind in PAIRS:
        if mine not in ours:
            continue
        gen = ours[mine]
        engines[("ours", mine)] = (lambda p, n, g=gen: ours_decode(g, p, n), lambda p, g=gen: ours_prefill(g, p))
        if mine in compiled:
            c = compiled[mine]
            engines[("ours, compiled", mine)] = (lambda p, n, g=c: ours_decode(g, p, n), lambda p, g=c: ours_prefill(g, p))
        if kind in theirs:
            r = theirs[kind]
            engines[("llama.cpp", kind)] = (r.decode, r.prefill)
    if "transformers" not in a.skip:
        from benchmarks.hf_reference import hf_model_from_meta

        vocab = ours["fp32"].model.params.vocab_size
        for mine in ("fp32", "bf16"):
            model = hf_model_from_meta(ckpt, vocab, getattr(torch, OUR_BUILDS[mine][0]), "sdpa")
            engines[("transformers", mine)] = (lambda p, n, m=model: hf_decode(m, p, n), lambda p, m=model: hf_prefill(m, p))
    for decode, prefill in engines.values():  # warm up: first calls pick kernels and allocate
        decode(prompt[:8], 4)
        prefill(long_prompt)
    return engines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", default="llama.cpp", choices=["llama.cpp"], help="the peer engine (llama.cpp)")
    ap.add_argument("--ckpt_dir", type=Path, default=REPO / "checkpoints" / "SmolLM2-135M-Instruct")
    ap.add_argument("--gguf", type=Path, help="a GGUF of the model's vocabulary, for llama.cpp's tokenizer "
                    "(default: CKPT_DIR.Q4_1.gguf next to the checkpoint, where quickstart.sh puts it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time ours with compiled decoding (Llama.build(compile=True))")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--gen_len", type=int, default=128)
    ap.add_argument("--prefill_len", type=int, default=512)
    ap.add_argument("--skip", nargs="*", default=[], choices=["llama.cpp", "transformers", "quality"])
    ap.add_argument("--json", type=Path, help="write every figure here")
    a = ap.parse_args(argv)
    ckpt = a.ckpt_dir
    a.gguf = a.gguf or ckpt.with_name(ckpt.name + ".Q4_1.gguf")
    if "llama.cpp" not in a.skip and not a.gguf.is_file():
        ap.error(f"{a.gguf} not found: pass --gguf with a GGUF file of this model's vocabulary (its tokenizer "
                 "is copied into llama.cpp's files), or --skip llama.cpp")
    torch.set_num_threads(a.threads)
    if "llama.cpp" not in a.skip:  # its AMX / repacked buffers crash Q8_0 evals on AMX CPUs (llamacpp_peer says why)
        from benchmarks import llamacpp_peer

        llamacpp_peer.without_extra_buffers()
    res = {"config": {"model": ckpt.name, "threads": a.threads, "rounds": a.rounds, "prompt_len": a.prompt_len,
                      "gen_len": a.gen_len, "prefill_len": a.prefill_len},
           "machine": machine("llama.cpp" not in a.skip)}
    tokens = Tokenizer.from_file(ckpt / "tokenizer.model").encode(TEXT.read_text(encoding="utf-8"), bos=True, eos=False)
    if len(tokens) < a.prefill_len:
        ap.error(f"{TEXT} has {len(tokens)} tokens, fewer than --prefill_len {a.prefill_len}")
    prompt, long_prompt = tokens[: a.prompt_len], tokens[: a.prefill_len]
    engines = engines_to_time(a, ckpt, prompt, long_prompt, res)
    res["speed"] = measure(engines, a, prompt, long_prompt)
    del engines
    if "quality" not in a.skip:
        for mine in [q for q in QUANTIZED if q in our_builds()]:
            res[f"quality_{mine}"] = quantization_quality(ckpt, mine, TEXT, positions=QUALITY_POSITIONS,
                                                          threads=a.threads)
        if "llama.cpp" not in a.skip:  # its Q8_0 and Q4_1 on the same tokens, for scale
            from benchmarks import llamacpp_peer

            files = llamacpp_peer.peer_files(ckpt, a.gguf, a.threads, log=lambda m: print(m, file=sys.stderr))
            forced = tokens[:QUALITY_POSITIONS + 1]
            theirs = llamacpp_peer.quantization_quality(files, forced, TEXT.name, a.threads, list(QUANTIZED.values()))
            res.update({f"quality_llama_cpp_{kind}": q for kind, q in theirs.items()})
    print(report(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
