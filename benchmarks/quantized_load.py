"""Load time, peak memory and speed of quantized checkpoints, ours beside llama.cpp, in one run.

    python benchmarks/quantized_load.py                      # SmolLM2-1.7B's shape, random bf16 weights
    python benchmarks/quantized_load.py --shape 135m --json out.json
    python benchmarks/quantized_load.py --shape 8b           # Llama 3.1 8B's shape, ours int4 only

Design: every figure comes from a fresh child process (this script with
--child), so that no engine inherits another's pages, threads or kernels
(llama-cpp-python crashed beside our kernels in one process). A load child
builds the model and runs one decode step; its peak resident memory is VmHWM,
sampled from /proc by the parent (benchmarks/peak_memory.measure) and read by
the child itself at exit. A speed child loads, warms up, then times decode
(ms/token, batch 1, greedy) and one prefill; rounds interleave the engines.
Rows: ours bf16 / int8 / int4 (checkpoints written once by `llama quantize`,
llama/weights/quantizer.py) and int4 quantized at load from the float file,
beside llama.cpp's BF16 / Q8_0 / Q4_1 / Q4_K_M made by its own quantizer from
the F32 GGUF our exporter writes (benchmarks/llamacpp_peer.py).

Invariants: the same n_ctx (KV cache) for both engines, the same token ids,
the same threads; files are made once under ~/.cache/llama-bench/quantized/
<shape>/ ($LLAMA_BENCH_CACHE) and reused. "8b" makes no float file: its int4
checkpoint is written directly with random blocks (random_int4_checkpoint).

llama.cpp loads without its "extra" weight buffers (AMX, repacked layouts)
unless --llama_cpp_extra_bufts: the llama-cpp-python build here crashes
(SIGSEGV) in multi-token evals of Q8_0 files with them on an AMX CPU, so its
figures are those of its plain CPU kernels, and the table says so.

Failure modes: without llama-cpp-python its rows say "not installed"; a
child that fails gives a row with its error and the tail of its stderr; the
numbers are wall-clock figures on a possibly shared machine, not assertions.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.peak_memory import _status, measure  # noqa: E402

CACHE = Path(os.environ.get("LLAMA_BENCH_CACHE", Path.home() / ".cache" / "llama-bench")) / "quantized"
CHECKPOINTS = Path(os.environ.get("LLAMA_TEST_CACHE", REPO / "checkpoints"))
SMOL = "SmolLM2-135M-Instruct"
# family, dim, n_layers, n_heads, n_kv_heads, vocab, multiple_of, ffn_dim_multiplier, tokenizer
SHAPES = {
    "tiny": ("llama3", 256, 2, 4, 4, 49152, 256, None, f"{SMOL}/tokenizer.model"),  # 50 MB in bf16
    "1.7b": ("llama3", 2048, 24, 32, 32, 49152, 256, 1.5, f"{SMOL}/tokenizer.model"),  # ffn 8192
    "8b": ("llama3.1", 4096, 32, 32, 8, 128256, 1024, 1.3, "llama3_tokenizer.model"),  # ffn 14336
}
OURS = {"bf16": ("bf16", None), "int8": ("int8", None), "int4": ("int4", None),
        "Q4_K_M blocks": ("q4_k_m", None),  # llama.cpp's Q4_K_M file through llama convert (its blocks kept)
        "int4 at load": ("bf16", "int4")}
THEIRS = ("BF16", "Q8_0", "Q4_1", "Q4_K_M")
GB = 1e9


def timed(what: str, make):
    print(f"making {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = make()
    print(f"  made {what} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def random_int4_checkpoint(out: Path, params: dict, tokenizer: Path) -> Path:
    """A random checkpoint stored int4 (q4_1, output q8_0) written tensor by tensor, never
    holding a float model: uniform nibbles and int8s with scales that keep activations O(1)."""
    import torch

    from llama.weights import mapped, quantized
    from llama.weights.args import ModelArgs
    from llama.weights.quantizer import planned_types, shard_spec
    from llama.weights.schema import model_weights
    from llama.weights.writer import StreamedShard, write_checkpoint

    args = ModelArgs.from_params(params)
    schema = model_weights(args)
    state = {k: torch.empty(w.shape, dtype=torch.bfloat16, device="meta") for k, w in schema.items()}
    types = planned_types(state, args, "int4")

    def fill(o):
        for key, w in schema.items():
            done = [o[key]] + ([o[quantized.scales_key(key)]] if key in types else [])
            for i in range(0, w.shape[0], quantized.ROW_CHUNK):
                rows = slice(i, i + quantized.ROW_CHUNK)
                if w.kind == "norm":
                    o[key].fill_(1.0)
                elif key not in types:  # the embedding
                    o[key][rows] = torch.randn(o[key][rows].shape)
                elif types[key] == "q4_1":  # nibbles 0..15: mean 7.5, std 4.6
                    o[key][rows] = torch.randint(0, 256, o[key][rows].shape, dtype=torch.uint8)
                    d = 1 / (4.6 * w.shape[1] ** 0.5)
                    o[quantized.scales_key(key)][rows] = torch.tensor([d, -7.5 * d], dtype=torch.float16)
                else:  # q8_0: uniform in [-127, 127], std 73
                    o[key][rows] = torch.randint(-127, 128, o[key][rows].shape, dtype=torch.int8)
                    o[quantized.scales_key(key)][rows] = 4 / (73 * w.shape[1] ** 0.5)
            mapped.release(done)
            yield sum(t.nbytes for t in done)

    params = {**params, quantized.PARAMS_KEY: quantized.describe(types, "int4", source="random (quantized_load.py)")}
    return write_checkpoint(out, params, [StreamedShard(shard_spec(state, types), fill)], tokenizer_path=tokenizer)


def make_files(shape: str, threads: int, skip_llama_cpp: bool) -> dict:
    """{row name: checkpoint dir or GGUF path, or a reason string}, made once under CACHE/shape."""
    base = CACHE / shape
    base.mkdir(parents=True, exist_ok=True)
    files: dict = {}
    if shape == "135m":
        float_dir, tok = CHECKPOINTS / SMOL, CHECKPOINTS / SMOL / "tokenizer.model"
    else:
        from llama.weights.random_weights import make_random_checkpoint, random_params

        family, dim, layers, heads, kv, vocab, mult, ffn, tok = SHAPES[shape]
        tok, params = CHECKPOINTS / tok, random_params(family, dim, layers, heads, kv, vocab, mult, ffn)
        float_dir = base / "bf16"
        if shape == "8b":  # ours int4 only: a float file would be 16 GB
            if not (base / "int4" / "params.json").is_file():
                timed(f"a random int4 checkpoint in {base / 'int4'}", lambda: random_int4_checkpoint(base / "int4", params, tok))
            return {"int4": base / "int4", "tokenizer": tok}
        if not (float_dir / "params.json").is_file():
            timed(f"a random bf16 checkpoint in {float_dir}",
                  lambda: make_random_checkpoint(float_dir, params, tok, force=True))
    files.update({"bf16": float_dir, "int4 at load": float_dir, "tokenizer": tok})
    for method in ("int8", "int4"):
        if not (base / method / "params.json").is_file():
            from llama.weights.quantizer import quantize_checkpoint
            timed(f"{base / method} (llama quantize --quantize {method})",
                  lambda m=method: quantize_checkpoint(float_dir, base / m, m, progress=lambda _: None, force=True))
        files[method] = base / method
    if skip_llama_cpp or not have_llama_cpp():
        files.update({kind: "not installed" if not skip_llama_cpp else "skipped" for kind in THEIRS})
    else:
        from benchmarks.llamacpp_peer import peer_files
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        made = timed("llama.cpp's files", lambda: peer_files(float_dir, CHECKPOINTS / f"{SMOL}.Q4_1.gguf", threads,
                                                               cache=base, log=log, kinds=THEIRS))
        files.update({kind: made[kind] for kind in THEIRS})
        kept = base / "q4_k_m"
        if not (kept / "params.json").is_file():
            from llama.cli.checkpoints import convert_gguf
            timed(f"{kept} (llama convert of {made['Q4_K_M'].name}, blocks kept)",
                  lambda: convert_gguf(made["Q4_K_M"], kept, dtype="bfloat16", force=True))
        files["Q4_K_M blocks"] = kept
    return files


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("consolidated.*.pth")) if Path(path).is_dir() \
        else Path(path).stat().st_size


def kv_bytes(ckpt: Path, n_ctx: int) -> int:
    """K and V of every layer for n_ctx positions at 2 bytes a value (ours bf16, llama.cpp's default f16)."""
    p = json.loads((Path(ckpt) / "params.json").read_text())
    kv = p.get("n_kv_heads", p["n_heads"])
    return 2 * p["n_layers"] * n_ctx * kv * (p["dim"] // p["n_heads"]) * 2


# ---- child processes ------------------------------------------------------------------------------------

def child(a) -> None:
    """Loads one model (+ one decode step); with --speed also times decode and prefill. Prints one JSON line."""
    tokens = [int(t) for t in a.tokens.split(",")]
    prompt, long_prompt = tokens[: a.prompt_len], tokens[: a.prefill_len]
    if a.child == "ours":
        from benchmarks.peer_benchmark import ours_decode, ours_prefill
        from benchmarks.quant_quality import build

        start = time.perf_counter()  # after the imports: the load is Llama.build and one decode step
        gen = build(a.target, "bfloat16", a.quantize, a.n_ctx, a.threads)
        gen.tokenizer.stop_tokens = frozenset()  # every run generates its full length
        gen.generate([prompt[:1]], 1, temperature=0)
        decode, prefill = (lambda p, n: ours_decode(gen, p, n)), (lambda p: ours_prefill(gen, p))
    else:
        from benchmarks import llamacpp_peer

        if not a.llama_cpp_extra_bufts:
            llamacpp_peer.without_extra_buffers()
        start = time.perf_counter()
        runner = llamacpp_peer.LlamaCppRunner(Path(a.target), a.threads, a.n_ctx)
        runner.llm.eval(prompt[:1])
        decode, prefill = runner.decode, runner.prefill
    out = {"load_s": time.perf_counter() - start, **_status(os.getpid())}
    if a.speed:
        decode(prompt[:8], 4)  # warm-up: first calls pick kernels and allocate
        prefill(long_prompt[:64])
        out.update(decode(prompt, a.gen_len))
        out.update(prefill(long_prompt))
    print("RESULT " + json.dumps(out), flush=True)


def run_child(a, engine: str, target, quant, speed: bool, tokens) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--target", str(target),
           "--tokens", ",".join(map(str, tokens)), "--n_ctx", str(a.n_ctx), "--threads", str(a.threads),
           "--prompt_len", str(a.prompt_len), "--gen_len", str(a.gen_len), "--prefill_len", str(a.prefill_len)]
    cmd += (["--quantize", quant] if quant else []) + (["--speed"] if speed else [])
    cmd += ["--llama_cpp_extra_bufts"] if a.llama_cpp_extra_bufts else []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        m = measure(cmd, stdout=out, stderr=err)
        out.seek(0), err.seek(0)
        lines = [x for x in out.read().splitlines() if x.startswith("RESULT ")]
        if m["returncode"] != 0 or not lines:
            return {"error": f"exit code {m['returncode']}: " + " | ".join(err.read().strip().splitlines()[-3:])}
    r = json.loads(lines[-1][len("RESULT "):])
    peak = {k: max(m[k], r.pop(k, 0)) for k in ("VmHWM", "RssAnon", "RssFile")}
    return {**r, **peak, "process_s": m["seconds"]} if not speed else r


def rows_to_run(files: dict) -> list:
    """(row name, engine, target, quantize-at-load) of every row, ours beside theirs of the same bits."""
    rows = [(name, "ours", files[name], OURS[name][1]) for name in OURS if name in files]
    rows += [(kind, "llama.cpp", files[kind], None) for kind in THEIRS if kind in files]
    return rows


def load_row(a, files: dict, tokens, name, engine, target, quant) -> dict:
    res = {"engine": engine, "type": name}
    if isinstance(target, str):
        return {**res, "error": target}
    res.update({"file_bytes": file_bytes(target), "kv_bytes": kv_bytes(files.get("int4"), a.n_ctx)})
    if quant:  # quantized at load: what it holds is the int4 file's weights
        res["weights_bytes"] = file_bytes(files[quant])
    print(f"loading {engine} {name} ...", file=sys.stderr, flush=True)
    res.update(run_child(a, engine, target, quant, False, tokens))
    print(f"  {res.get('load_s', float('nan')):.2f} s, VmHWM {res.get('VmHWM', 0) / GB:.2f} GB "
          f"{res.get('error', '')}", file=sys.stderr, flush=True)
    return res


def measure_all(a, files: dict, tokens) -> list:
    """Load rows, then the speed rounds, then quantizing at load (the slow one, last: a run cut short
    keeps the rest). --json is written after each phase."""
    rows = rows_to_run(files)
    results = [load_row(a, files, tokens, *row) if row[0] != "int4 at load" else None for row in rows]
    save = lambda: a.json and a.json.write_text(json.dumps({"rows": [r for r in results if r]}, indent=1,  # noqa: E731
                                                           default=str) + "\n")
    save()
    speed = [(r, row) for r, row in zip(results, rows) if r and "error" not in r]
    for i in range(a.rounds if a.gen_len else 0):
        for r, (_, engine, target, quant) in speed:
            r.setdefault("rounds", []).append(run_child(a, engine, target, quant, True, tokens))
        done = ", ".join(f"{r['type']} {r['rounds'][-1].get('decode_ms', float('nan')):.1f}" for r, _ in speed)
        print(f"  round {i + 1} of {a.rounds} (decode ms/token): {done}", file=sys.stderr, flush=True)
    for r, _ in speed:
        for key in ("decode_ms", "prefill_ms"):
            values = [x[key] for x in r.get("rounds", []) if key in x]
            if values:
                r[key] = statistics.median(values)
        errors = [x["error"] for x in r.get("rounds", []) if "error" in x]
        if errors:
            r["speed_error"] = errors[0]
    save()
    results = [r if r else load_row(a, files, tokens, *row) for r, row in zip(results, rows)]
    return results


def table(results: list) -> str:
    head = ("engine", "type", "file GB", "load s", "process s", "VmHWM GB", "RssAnon GB", "RssFile GB",
            "VmHWM / (weights+KV)", "decode ms/tok", "prefill ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r and "load_s" not in r:
            cells = [r["engine"], r["type"], r["error"]] + [""] * (len(head) - 3)
        else:
            f = lambda k, scale=1.0, fmt="{:.2f}": fmt.format(r[k] / scale) if k in r else "-"  # noqa: E731
            ratio = r["VmHWM"] / (r.get("weights_bytes", r["file_bytes"]) + r["kv_bytes"])
            cells = [r["engine"], r["type"], f("file_bytes", GB), f("load_s"), f("process_s"), f("VmHWM", GB),
                     f("RssAnon", GB), f("RssFile", GB), f"{ratio:.2f}", f("decode_ms", fmt="{:.1f}"),
                     f("prefill_ms", fmt="{:.0f}")]
            if "speed_error" in r and "decode_ms" not in r:
                cells[-2:] = ["failed: " + r["speed_error"][:120], ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(a) -> dict:
    from llama.common.cpu import cpu_flags, cpuinfo_text

    model = next((x.split(":", 1)[1].strip() for x in (cpuinfo_text() or "").splitlines() if x.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": model, "flags": " ".join(sorted(cpu_flags() or [])),
            "shape": a.shape, "threads": a.threads, "n_ctx": a.n_ctx, "rounds": a.rounds, "prompt_len": a.prompt_len,
            "gen_len": a.gen_len, "prefill_len": a.prefill_len, "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.7b", choices=["tiny", "135m", "1.7b", "8b"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n_ctx", type=int, default=1024, help="KV cache positions, ours (max_seq_len) and llama.cpp's")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved speed rounds (0: load figures only)")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--gen_len", type=int, default=64)
    ap.add_argument("--prefill_len", type=int, default=512)
    ap.add_argument("--skip_llama_cpp", action="store_true")
    ap.add_argument("--llama_cpp_extra_bufts", action="store_true", help="let llama.cpp use its AMX / repacked "
                    "weight buffers (off by default: its build here crashes with them on Q8_0 files)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    ap.add_argument("--child", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--speed", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if a.n_ctx < max(a.prefill_len + 1, a.prompt_len + a.gen_len):
        ap.error(f"--n_ctx {a.n_ctx} is shorter than the prefill ({a.prefill_len}) or prompt + generation: raise it")
    info = header(a)
    print(f"# quantized load, shape {a.shape}, {info['date']}\n# CPU: {info['cpu']}\n# flags: {info['flags']}", flush=True)
    files = make_files(a.shape, a.threads, a.skip_llama_cpp)
    from benchmarks.quant_quality import TEXT
    from llama.text.tokenizer import Tokenizer

    tokens = Tokenizer.from_file(files["tokenizer"]).encode(TEXT.read_text(encoding="utf-8"), bos=True, eos=False)
    tokens = (tokens * (a.prefill_len // len(tokens) + 1))[: max(a.prefill_len, a.prompt_len)]
    results = measure_all(a, files, tokens)
    print(f"\n{info['date']}, {info['cpu']}, {a.threads} threads, n_ctx {a.n_ctx}, load average {info['load']}")
    print(f"CPU flags: {info['flags']}\n")
    print(table(results))
    if not a.llama_cpp_extra_bufts:
        print("\nllama.cpp ran without its AMX / repacked weight buffers (use_extra_bufts=False; see --help).")
    if a.json:
        a.json.write_text(json.dumps({"config": info, "rows": results}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
