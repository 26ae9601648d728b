"""The report of benchmarks/peer_benchmark.py, printed from its figures (no
torch, no llama_cpp): the machine, the greedy check, the speed table with
ratios and the quantization quality table, all as Markdown.

Figures come as a dict (the benchmark's --json file holds the same):

    {"config": {...}, "machine": {...}, "greedy": {...},
     "speed": {"ours": {"fp32": {"decode_ms": .., "prefill_ms": ..}, ..},
               "llama.cpp": {"F32": {..}, ..}, "transformers": {"fp32": {..}, ..}},
     "quality": {...}, "quality_llama_cpp": {...}, ...}

Every key that starts with "quality" is a quality table, printed in order.
"""

import statistics
from typing import Dict, List, Optional

# Our precision -> llama.cpp's file type holding the same weights.
PAIRS = (("fp32", "F32"), ("bf16", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_1"))
FLAG_PREFIXES = ("avx2", "avx512", "amx", "avx_vnni", "fma", "f16c")


def cpu_flags_of_interest(flags) -> List[str]:
    """The instruction-set flags that decide which kernels are fast, sorted."""
    return sorted(f for f in set(flags) if f.startswith(FLAG_PREFIXES))


def ratio(theirs_ms: Optional[float], ours_ms: Optional[float]) -> str:
    """Speed ours / theirs as their time over ours: above 1.00x we are faster."""
    if not theirs_ms or not ours_ms:
        return ""
    return f"{theirs_ms / ours_ms:.2f}x"


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def header_lines(res: dict) -> List[str]:
    c, m = res["config"], res["machine"]
    flags = cpu_flags_of_interest(m.get("flags", ()))
    missing = [name for name, prefix in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx"))
               if not any(f.startswith(prefix) for f in flags)]
    lines = [
        f"# {c['model']} side by side with llama.cpp: batch 1, greedy, {c['prompt_len']}-token prompt, "
        f"{c['gen_len']} new tokens, stop tokens off, {c['threads']} thread{'s' * (c['threads'] != 1)}, "
        f"median of {c['rounds']} interleaved rounds",
        "",
        f"- CPU: {m.get('cpu', '?')}, {m.get('cores', '?')} cores visible; flags: {' '.join(flags) or 'none of interest'}"
        + (f" (no {', no '.join(missing)})" if missing else ""),
        f"- torch {m.get('torch', '?')} (CPU capability {m.get('torch_cpu_capability', '?')}, "
        f"oneDNN bf16 {'yes' if m.get('onednn_bf16') else 'no'}); transformers {m.get('transformers', 'not installed')}",
        f"- llama.cpp: llama-cpp-python {m['llama_cpp']}" + (f" ({m['llama_cpp_system']})" if m.get("llama_cpp_system") else "")
        if m.get("llama_cpp") else "- llama.cpp: not run",
    ]
    if m.get("load"):
        lines.append(f"- machine load average at start: {m['load']}")
    return lines


def greedy_line(g: dict) -> str:
    """How far llama.cpp F32 and our fp32 agree on the greedy continuation."""
    n, same = g["total"], g["same_prefix"]
    where = "all identical" if same == n else f"first difference at token {same + 1}"
    line = (f"Greedy check, llama.cpp F32 against ours fp32 on the same {g['prompt_len']}-token prompt: "
            f"{same} of {n} tokens identical ({where}; {g['same_positions']} of {n} positions equal)")
    if "prompt_tokens_same" in g:
        line += "; llama.cpp tokenizes the prompt text " + ("identically" if g["prompt_tokens_same"] else "DIFFERENTLY")
    return line


def speed_table(res: dict) -> List[str]:
    """One row per engine and precision; ours beside the peer holding the same weights."""
    speed, c = res["speed"], res["config"]
    lcpp, ours, hf = speed.get("llama.cpp", {}), speed.get("ours", {}), speed.get("transformers", {})
    lcpp_name = f"llama.cpp {res['machine'].get('llama_cpp', '')}".strip()
    hf_name = f"transformers {res['machine'].get('transformers', '')}".strip()
    lines = [f"| engine | precision | decode ms/token | prefill ms ({c['prefill_len']}-token prompt) "
             "| decode ours/theirs | prefill ours/theirs |", "|---|---|---|---|---|---|"]
    for mine, theirs in PAIRS:
        t, o = lcpp.get(theirs), ours.get(mine)
        if t:
            lines.append(f"| {lcpp_name} | {theirs} | {_ms(t['decode_ms'])} | {_ms(t['prefill_ms'])} | | |")
        for name, o in (("ours", o), ("ours, compiled", speed.get("ours, compiled", {}).get(mine))):
            if o:
                lines.append(f"| {name} | {mine} | {_ms(o['decode_ms'])} | {_ms(o['prefill_ms'])} "
                             f"| {ratio(t and t['decode_ms'], o['decode_ms'])} "
                             f"| {ratio(t and t['prefill_ms'], o['prefill_ms'])} |")
    for mine in ("fp32", "bf16"):
        t, o = hf.get(mine), ours.get(mine)
        if t:
            lines.append(f"| {hf_name} | {mine} | {_ms(t['decode_ms'])} | {_ms(t['prefill_ms'])} "
                         f"| {ratio(t['decode_ms'], o and o['decode_ms'])} "
                         f"| {ratio(t['prefill_ms'], o and o['prefill_ms'])} |")
    lines.append("")
    lines.append("ours/theirs = their time / our time (above 1.00x we are faster); transformers rows compare "
                 "with ours in the same precision.")
    if any("decode_wall_ms" in v for v in lcpp.values()):
        walls = ", ".join(f"{k} {_ms(v['decode_wall_ms'])}" for k, v in lcpp.items() if "decode_wall_ms" in v)
        lines.append(f"llama.cpp times are its own counters (llama_perf_context); through llama-cpp-python's "
                     f"Python loop a decode step took {walls} ms.")
    return lines


def quality_table(q: dict) -> List[str]:
    """Top-1 agreement with bf16 and perplexity, teacher-forced on a fixed text
    in one pass, then (where measured) one token a step."""
    name = q["quantize"]
    engine = f"{q['engine']}'s " if q.get("engine") else ""
    lines = [f"Quality of {engine}{name} on the real model: teacher-forced on {q['text']} ({q['positions']} positions)",
             "", *_quality_rows(q, name)]
    if q.get("decoding"):
        lines += ["", "The same, one token a step through the KV cache (the decoding kernels generation runs):", "",
                  *_quality_rows(q["decoding"], name)]
    return lines


def _quality_rows(q: dict, name: str) -> List[str]:
    lines = ["| model | same top-1 as bf16 | same top-1 as fp32 | perplexity | perplexity vs bf16 |",
             "|---|---|---|---|---|"]
    base = q["perplexity"]["bf16"]

    def share(table: str, model: str) -> str:
        agree = q.get(table, {}).get(model)
        return "—" if agree is None else f"{100 * agree:.1f}%"

    for model in ("fp32", "bf16", name):
        ppl = q["perplexity"][model]
        change = "" if model == "bf16" else f"{100 * (ppl / base - 1):+.2f}%"
        lines.append(f"| {model} | {share('agreement_with_bf16', model)} | {share('agreement_with_fp32', model)} "
                     f"| {ppl:.3f} | {change} |")
    return lines


def report(res: dict) -> str:
    """The whole report as Markdown text."""
    parts: List[str] = header_lines(res) + [""]
    if res.get("greedy"):
        parts += [greedy_line(res["greedy"]), ""]
    if res.get("speed"):
        parts += speed_table(res) + [""]
    for key, q in res.items():
        if key.startswith("quality") and q:
            parts += quality_table(q) + [""]
    return "\n".join(parts)


def medians(rounds: List[Dict[str, float]]) -> Dict[str, float]:
    """Per key, the median over rounds."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
