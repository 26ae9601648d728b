"""benchmarks/benchmark.py's report, printed from a fixed set of figures:
headings, units, one table row per measurement, no checklist of targets; and
benchmarks/peer_report.py's (ours beside llama.cpp) and the quantization quality figures."""

from types import SimpleNamespace

import pytest

from benchmarks.benchmark import print_table


def figures(prefill, decode, gb_s):
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "bandwidth_GB_s": gb_s, "weight_GB": 1.0}


def test_report(capsys):
    a = SimpleNamespace(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, threads=2, prompt_len=128, gen_len=32, rounds=3)
    res = {
        "ours_bfloat16_b1": figures(150, 11.2, 20.1), "hf_bfloat16_b1": {"prefill_tok_s": 120, "decode_tok_s": 8.0},
        "ours_int8_b1": figures(100, 15.1, 13.0), "ours_int4_b1": figures(90, 19.5, 11.0),
        "ours_float32_b1": figures(140, 7.9, 29.0), "hf_float32_b1": {"prefill_tok_s": 100, "decode_tok_s": 5.0},
        "int8_quality": {"top1_agreement": 0.91, "max_abs_logit_error": 0.3, "logit_range": 12.0,
                         "bf16_vs_fp32_top1_agreement": 0.95},
        "int4_quality": {"top1_agreement": 0.88, "max_abs_logit_error": 0.6, "logit_range": 12.0,
                         "bf16_vs_fp32_top1_agreement": 0.95},
        "read_bandwidth_GB_s": 29.0, "read_bandwidth_samples_GB_s": [26.0, 29.0, 31.0],
        "mp_decode_tok_s": {"float32": {"mp2": 7.1, "mp1": 7.9}}, "int8_decoding": "int8 dot products",
        "build": {"bfloat16": {"build_s": 1.2, "read_s": 0.8, "file_GB": 1.9, "page_cache": "warm"}},
    }
    print_table(res, a)
    out = capsys.readouterr().out
    assert "int8 (int8 dot products)" in out  # which int8 decoding ran
    int4 = next(line for line in out.splitlines() if line.strip().startswith("int4 (int8 dot products)"))
    assert int4.split()[4:7] == ["1", "90.0", "19.50"]
    assert "same top-1 token as bf16   88.0% of positions" in out
    assert "ours: median of 3 generations" in out
    for heading in ("Llama inference benchmark (CPU)", "Quality of int8", "Quality of int4", "Model parallelism",
                    "Loading"):
        assert heading in out
    lines = out.splitlines()
    assert "memory read bandwidth 29.0 GB/s" in out and any("tok/s" in line and "GB/s" in line for line in lines)
    bf16 = next(line for line in lines if line.strip().startswith("bf16") and "x" in line.split()[-1])
    assert bf16.split()[1:4] == ["1", "150.0", "11.20"] and bf16.endswith("1.40x")  # 11.2 / 8.0
    assert "7.10 tok/s against 7.90 tok/s (0.90x)" in out
    assert ">=" not in out and "target" not in out


# benchmarks/peer_report.py: ours beside llama.cpp and transformers, from fixed figures.

def peer_figures():
    return {
        "config": {"model": "SmolLM2-135M-Instruct", "threads": 2, "rounds": 3, "prompt_len": 32, "gen_len": 128,
                   "prefill_len": 512},
        "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "flags": ["fpu", "sse2", "avx", "avx2", "fma", "f16c"],
                    "torch": "2.13.0", "torch_cpu_capability": "AVX2", "onednn_bf16": False,
                    "transformers": "5.24.0", "llama_cpp": "0.3.36", "llama_cpp_system": "CPU : AVX2 = 1",
                    "load": "1.0 0.8 0.5"},
        "greedy": {"prompt_len": 32, "total": 128, "same_prefix": 101, "same_positions": 104,
                   "prompt_tokens_same": True},
        "speed": {
            "ours": {"fp32": {"decode_ms": 58.5, "prefill_ms": 129.0}, "bf16": {"decode_ms": 44.8, "prefill_ms": 468.0},
                     "int8": {"decode_ms": 38.9, "prefill_ms": 500.0}, "int4": {"decode_ms": 8.0, "prefill_ms": 510.0}},
            "llama.cpp": {"F32": {"decode_ms": 26.3, "prefill_ms": 120.0, "decode_wall_ms": 26.9},
                          "BF16": {"decode_ms": 17.3, "prefill_ms": 234.0, "decode_wall_ms": 17.8},
                          "Q8_0": {"decode_ms": 10.7, "prefill_ms": 100.0, "decode_wall_ms": 11.2},
                          "Q4_1": {"decode_ms": 9.0, "prefill_ms": 102.0, "decode_wall_ms": 9.4}},
            "transformers": {"fp32": {"decode_ms": 69.3, "prefill_ms": 300.0},
                             "bf16": {"decode_ms": 42.1, "prefill_ms": 936.0}},
        },
        "quality": {"quantize": "int8", "text": "pride_and_prejudice_ch1.txt", "positions": 512,
                    "agreement_with_bf16": {"fp32": 0.977, "int8": 0.951},
                    "agreement_with_fp32": {"bf16": 0.977, "int8": 0.949},
                    "perplexity": {"fp32": 16.845, "bf16": 16.788, "int8": 16.841}},
    }


def rows(out: str) -> dict:
    """Markdown table rows by (engine's first word, precision) -> cells."""
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 5 and not cells[0].startswith(("engine", "model", "---")):
            table[(cells[0].split()[0], cells[1])] = cells
    return table


def test_peer_report_table_and_ratios():
    from benchmarks.peer_report import report

    out = report(peer_figures())
    r = rows(out)
    assert r[("llama.cpp", "F32")] == ["llama.cpp 0.3.36", "F32", "26.3", "120", "", ""]
    assert r[("ours", "fp32")] == ["ours", "fp32", "58.5", "129", "0.45x", "0.93x"]  # 26.3 / 58.5, 120 / 129
    assert r[("ours", "bf16")][4:] == ["0.39x", "0.50x"]
    assert r[("ours", "int8")][4:] == ["0.28x", "0.20x"]
    assert r[("ours", "int4")][4:] == ["1.12x", "0.20x"]  # 9.0 / 8.0, 102 / 510
    assert r[("transformers", "fp32")] == ["transformers 5.24.0", "fp32", "69.3", "300", "1.18x", "2.33x"]
    assert r[("transformers", "bf16")][4:] == ["0.94x", "2.00x"]
    order = [k for k in r if k[0] in ("ours", "llama.cpp", "transformers")]
    assert order[:2] == [("llama.cpp", "F32"), ("ours", "fp32")]  # each of ours right below its peer
    assert "prefill ms (512-token prompt)" in out
    assert "decode step took F32 26.9, BF16 17.8, Q8_0 11.2, Q4_1 9.4 ms" in out


def test_peer_report_compiled_rows_sit_below_ours():
    from benchmarks.peer_report import report

    figures = peer_figures()
    figures["speed"]["ours, compiled"] = {"fp32": {"decode_ms": 26.3, "prefill_ms": 129.0}}
    r = rows(report(figures))
    assert r[("ours,", "fp32")] == ["ours, compiled", "fp32", "26.3", "129", "1.00x", "0.93x"]
    assert ("ours,", "bf16") not in r
    order = [k for k in r if k[0] in ("ours", "ours,", "llama.cpp")]
    assert order[:3] == [("llama.cpp", "F32"), ("ours", "fp32"), ("ours,", "fp32")]


def test_peer_report_header_and_greedy_check():
    from benchmarks.peer_report import report

    out = report(peer_figures())
    assert out.startswith("# SmolLM2-135M-Instruct side by side with llama.cpp: batch 1, greedy, 32-token prompt, "
                          "128 new tokens, stop tokens off, 2 threads, median of 3 interleaved rounds")
    assert "- CPU: AMD EPYC 7B13, 2 cores visible; flags: avx2 f16c fma (no AVX-512, no AVX512-BF16, no AMX)" in out
    assert "torch 2.13.0 (CPU capability AVX2, oneDNN bf16 no); transformers 5.24.0" in out
    assert "llama-cpp-python 0.3.36 (CPU : AVX2 = 1)" in out
    assert ("101 of 128 tokens identical (first difference at token 102; 104 of 128 positions equal); "
            "llama.cpp tokenizes the prompt text identically") in out


def test_peer_report_quality_table():
    from benchmarks.peer_report import report

    r = rows(report(peer_figures()))
    assert r[("fp32", "97.7%")] == ["fp32", "97.7%", "—", "16.845", "+0.34%"]
    assert r[("bf16", "—")] == ["bf16", "—", "97.7%", "16.788", ""]
    assert r[("int8", "95.1%")] == ["int8", "95.1%", "94.9%", "16.841", "+0.32%"]  # 16.841 / 16.788
    res = peer_figures()
    res["quality"]["decoding"] = {"agreement_with_bf16": {"fp32": 0.97, "int8": 0.985},
                                  "agreement_with_fp32": {"bf16": 0.97, "int8": 0.96},
                                  "perplexity": {"fp32": 16.8, "bf16": 16.9, "int8": 16.95}}
    out = report(res)
    assert "one token a step through the KV cache" in out
    assert rows(out)[("int8", "98.5%")] == ["int8", "98.5%", "96.0%", "16.950", "+0.30%"]
    res["quality_llama_cpp"] = {"quantize": "Q8_0", "engine": "llama.cpp", "text": "pride_and_prejudice_ch1.txt",
                                "positions": 512, "agreement_with_bf16": {"fp32": 0.994, "Q8_0": 0.963},
                                "agreement_with_fp32": {"bf16": 0.994, "Q8_0": 0.961},
                                "perplexity": {"fp32": 16.844, "bf16": 16.833, "Q8_0": 16.682}}
    res["quality_int4"] = {**res["quality"], "quantize": "int4", "agreement_with_bf16": {"fp32": 0.977, "int4": 0.982},
                           "agreement_with_fp32": {"bf16": 0.977, "int4": 0.984},
                           "perplexity": {"fp32": 16.845, "bf16": 16.788, "int4": 16.80}}
    del res["quality_int4"]["decoding"]
    out = report(res)
    assert (out.index("Quality of int8 on the real model") < out.index("Quality of llama.cpp's Q8_0 on the real model")
            < out.index("Quality of int4 on the real model"))  # in the order the benchmark measured them
    assert rows(out)[("Q8_0", "96.3%")] == ["Q8_0", "96.3%", "96.1%", "16.682", "-0.90%"]
    assert rows(out)[("int4", "98.2%")] == ["int4", "98.2%", "98.4%", "16.800", "+0.07%"]


def test_peer_report_without_llama_cpp_or_quality():
    from benchmarks.peer_report import report

    res = peer_figures()
    for key in ("llama_cpp", "llama_cpp_system"):
        del res["machine"][key]
    del res["speed"]["llama.cpp"], res["greedy"], res["quality"]
    out = report(res)
    r = rows(out)
    assert "- llama.cpp: not run" in out and "Greedy check" not in out and "Quality" not in out
    assert r[("ours", "fp32")][4:] == ["", ""] and ("llama.cpp", "F32") not in r
    assert r[("transformers", "bf16")][4:] == ["0.94x", "2.00x"]
    assert "llama_perf_context" not in out


def test_cpu_flags_and_medians():
    from benchmarks.peer_report import cpu_flags_of_interest, medians

    flags = "fpu sse4_2 avx2 avx512f avx512_bf16 amx_tile amx_bf16 avx_vnni fma avx512vl".split()
    assert cpu_flags_of_interest(flags) == ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f", "avx512vl",
                                            "avx_vnni", "fma"]
    assert medians([{"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 9.0}]) == {"a": 2.0, "b": 2.0}


def test_top1_agreement_and_perplexity():
    import math

    import torch

    from benchmarks.quant_quality import perplexity, top1_agreement

    a = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 1.0, 0.0], [4.0, 3.0, 1.0], [0.0, 0.0, 5.0], [0.0, 1.0, 0.0]])
    assert top1_agreement(a, b) == 0.5
    uniform = torch.zeros(4, 8)  # every token has probability 1/8: perplexity 8
    assert math.isclose(perplexity(uniform, torch.tensor([0, 3, 5, 7])), 8.0, rel_tol=1e-6)
    sure = torch.tensor([[0.0, 20.0], [20.0, 0.0]])
    assert perplexity(sure, torch.tensor([1, 0])) < 1.0001 < perplexity(sure, torch.tensor([0, 0]))


def test_quantization_quality_on_a_tiny_model(make_ckpt, tmp_path):
    """The quality report end to end on a tiny random model: fp32, bf16 and
    int8 read the same text; bf16 and int8 stay close to fp32."""
    from benchmarks.quant_quality import quantization_quality

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    q = quantization_quality(make_ckpt("llama3"), "int8", text, positions=24)
    assert q["quantize"] == "int8" and q["positions"] == 24 and q["text"] == "t.txt"
    assert sorted(q["perplexity"]) == ["bf16", "fp32", "int8"]
    assert sorted(q["agreement_with_bf16"]) == ["fp32", "int8"] and sorted(q["agreement_with_fp32"]) == ["bf16", "int8"]
    assert q["agreement_with_bf16"]["int8"] >= 0.75 and q["agreement_with_fp32"]["bf16"] >= 0.75
    ppl = q["perplexity"]
    assert ppl["fp32"] > 1 and abs(ppl["int8"] / ppl["bf16"] - 1) < 0.1
    steps = q["decoding"]  # one token a step: the decoding kernels
    assert abs(steps["perplexity"]["fp32"] / ppl["fp32"] - 1) < 1e-3  # fp32 decodes what its one pass computes
    assert steps["agreement_with_bf16"]["int8"] >= 0.75
    with pytest.raises(ValueError, match=r"the text has \d+ tokens; 500 positions need 501: pass a longer --text"):
        quantization_quality(make_ckpt("llama3"), "int8", text, positions=500)


def test_benchmark_peer_option_runs_the_peer_benchmark(monkeypatch, capsys):
    import sys

    from benchmarks import benchmark

    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--peer", "llama.cpp", "--help"])
    with pytest.raises(SystemExit) as e:
        benchmark.main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Ours beside llama.cpp and transformers on the same weights" in out and "--prefill_len" in out
