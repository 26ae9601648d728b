"""GGUF files run as they are: our logits beside llama.cpp's on the same file.

    python benchmarks/gguf_agreement.py                       # SmolLM2-135M: F32, Q8_0, Q4_0, Q4_1, Q4_K_M, Q6_K
    python benchmarks/gguf_agreement.py --types Q4_K_M --positions 512 --json out.json

For each llama.cpp file type, made by llama.cpp's own quantizer from the F32
GGUF our exporter writes of the quick start's checkpoint (benchmarks/llamacpp_peer.py,
cached), `llama convert` keeps the file's blocks (llama/weights/gguf.py) and
both engines teacher-force the same text (benchmarks/quant_quality.py's
512 positions of Pride and Prejudice): in one pass (prefill kernels) and one
token a step (decoding kernels: ours multiply int8 activations by the
blocks, as llama.cpp does). Printed per type:

* agreement with llama.cpp on the same file: the relative difference of
  each position's logits, max |ours - theirs| / max |theirs|, its mean and
  max over positions, and the share of positions with the same top-1 token;
* each engine against exact math on the file's weights: the same figure
  against our float32 model of the file expanded (`llama convert
  --dequantize`). Both engines quantize activations to int8 where they
  multiply by blocks (llama.cpp in prefill and decoding, ours in decoding),
  each its own way: that, not the weights, is where they part;
* quality against each engine's own bf16: top-1 agreement and perplexity
  (ours: the float32 checkpoint run in bf16; llama.cpp: its BF16 file).

llama.cpp runs in a child process per file, without its extra (AMX,
repacked) weight buffers, whose build crashed on this AMX machine
(benchmarks/llamacpp_peer.py without_extra_buffers).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.quant_quality import TEXT, build, perplexity, teacher_forced_logits, text_tokens, top1_agreement  # noqa: E402

TYPES = ("F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q6_K")  # F32: how far apart the engines are without quantization

CHILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from benchmarks.llamacpp_peer import import_llama_cpp, without_extra_buffers
without_extra_buffers()  # its AMX / repacked buffers crash multi-token evals here (llamacpp_peer says why)
llama_cpp = import_llama_cpp()
tokens = [int(t) for t in open(sys.argv[3]).read().split()]
batch = 1 if sys.argv[6] == "steps" else 512
# The KV cache in float32 (llama.cpp's default is float16), as ours in a float32 model.
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=len(tokens) + 8, n_batch=batch, n_ubatch=batch,
                      n_threads=int(sys.argv[5]), n_threads_batch=int(sys.argv[5]), logits_all=True, verbose=False,
                      type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
llm.eval(tokens)
np.save(sys.argv[4], np.array(llm.scores[: len(tokens)], dtype=np.float32))
"""


def llama_cpp_logits(path: Path, tokens, threads: int, steps: bool, tmp: Path) -> torch.Tensor:
    """llama.cpp's teacher-forced logits of `tokens` on the GGUF `path`, from a child process."""
    (tmp / "tokens.txt").write_text(" ".join(map(str, tokens)))
    out = tmp / "logits.npy"
    subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(path), str(tmp / "tokens.txt"), str(out),
                    str(threads), "steps" if steps else "pass"], check=True)
    return torch.from_numpy(np.load(out))


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Per position: max |ours - theirs| / max |theirs|."""
    return (ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)


def peer_file(files: dict, kind: str, threads: int) -> Path:
    """llama.cpp's `kind` file of the quick start's model, made from the F32 GGUF once."""
    from benchmarks.llamacpp_peer import quantize

    if kind in files:
        return files[kind]
    path = files["F32"].with_name(files["F32"].name.replace("-F32.gguf", f"-{kind}.gguf"))
    if not path.is_file():
        print(f"quantizing {path} with llama.cpp's quantizer", flush=True)
        quantize(files["F32"], path, kind, threads)
    return path


def ours_on(gguf: Path, out_dir: Path, tokens, positions: int, threads: int) -> dict:
    """Our logits on the GGUF's own blocks (converted keeping them), in one
    pass and stepped, and, as "exact", in one pass on the same weights
    expanded to float32 (--dequantize): the file's weights with float32
    activations, which neither engine's int8 activations reach exactly."""
    from llama.cli.checkpoints import convert_gguf

    out = {}
    for name, dequantize in (("exact", True), ("blocks", False)):
        ckpt = convert_gguf(gguf, out_dir / name, force=True, dequantize=dequantize)
        gen = build(ckpt, "float32", None, positions + 1, threads)
        out["exact" if dequantize else "pass"] = teacher_forced_logits(gen, tokens)[:-1]
        if not dequantize:
            out["steps"] = teacher_forced_logits(gen, tokens, steps=True)[:-1]
        del gen
    return out


def measure(ckpt: Path, gguf_tokenizer: Path, kinds, positions: int, threads: int) -> dict:
    from benchmarks.llamacpp_peer import MORE_FTYPES, QUANT_FTYPES, peer_files

    files = peer_files(ckpt, gguf_tokenizer, threads)
    gen = build(ckpt, "bfloat16", None, positions + 1, threads)
    tokens = text_tokens(gen, TEXT.read_text(encoding="utf-8"), positions)
    targets = torch.tensor(tokens[1:])
    ours_bf16 = teacher_forced_logits(gen, tokens)[:-1]
    del gen
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        theirs_bf16 = llama_cpp_logits(files["BF16"], tokens, threads, False, tmp)[:-1]
        for kind in kinds:
            if kind != "F32" and kind not in QUANT_FTYPES and kind not in MORE_FTYPES:
                MORE_FTYPES[kind] = f"LLAMA_FTYPE_MOSTLY_{kind}"
            path = peer_file(files, kind, threads)
            ours = ours_on(path, tmp / kind, tokens, positions, threads)
            row = {"file": path.name}
            for how in ("pass", "steps"):
                theirs = llama_cpp_logits(path, tokens, threads, how == "steps", tmp)[:-1]
                rel = relative_difference(ours[how], theirs)
                row[how] = {"relative_max": rel.max().item(), "relative_mean": rel.mean().item(),
                            "top1_same": top1_agreement(theirs, ours[how])}
                for engine, logits in (("ours", ours[how]), ("llama_cpp", theirs)):  # each against exact math
                    rel = relative_difference(logits, ours["exact"])
                    row[how][f"{engine}_vs_exact"] = {"max": rel.max().item(), "mean": rel.mean().item()}
                if how == "pass":
                    row["quality"] = {"ours_agreement_with_bf16": top1_agreement(ours_bf16, ours[how]),
                                      "llama_cpp_agreement_with_bf16": top1_agreement(theirs_bf16, theirs),
                                      "ours_perplexity": perplexity(ours[how], targets),
                                      "llama_cpp_perplexity": perplexity(theirs, targets)}
            results[kind] = row
            print(json.dumps({kind: row}), flush=True)
    results["bf16_perplexity"] = {"ours": perplexity(ours_bf16, targets), "llama_cpp": perplexity(theirs_bf16, targets)}
    return results


def table(results: dict) -> str:
    lines = ["| file type | pass: max / mean rel. diff, same top-1 | steps: max / mean, same top-1 | "
             "top-1 vs bf16 ours / llama.cpp | perplexity ours / llama.cpp | vs exact, mean: ours pass / steps, "
             "llama.cpp pass / steps |", "|---|---|---|---|---|---|"]
    for kind, r in results.items():
        if kind == "bf16_perplexity":
            continue
        p, s, q = r["pass"], r["steps"], r["quality"]
        lines.append(f"| {kind} | {p['relative_max']:.2e} / {p['relative_mean']:.2e}, {p['top1_same']:.1%} | "
                     f"{s['relative_max']:.2e} / {s['relative_mean']:.2e}, {s['top1_same']:.1%} | "
                     f"{q['ours_agreement_with_bf16']:.1%} / {q['llama_cpp_agreement_with_bf16']:.1%} | "
                     f"{q['ours_perplexity']:.3f} / {q['llama_cpp_perplexity']:.3f} | "
                     f"{p['ours_vs_exact']['mean']:.1e} / {s['ours_vs_exact']['mean']:.1e}, "
                     f"{p['llama_cpp_vs_exact']['mean']:.1e} / {s['llama_cpp_vs_exact']['mean']:.1e} |")
    b = results["bf16_perplexity"]
    lines.append(f"\nbf16 perplexity: ours {b['ours']:.3f}, llama.cpp {b['llama_cpp']:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", type=Path, default=REPO / "checkpoints" / "SmolLM2-135M-Instruct")
    ap.add_argument("--gguf", type=Path, default=REPO / "checkpoints" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="a GGUF of the same vocabulary: its tokenizer goes into the F32 export")
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = measure(a.ckpt_dir, a.gguf, a.types, a.positions, a.threads)
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
