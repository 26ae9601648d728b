"""benchmarks/benchmark.py's report, printed from a fixed set of figures:
headings, units, one table row per measurement, no checklist of targets."""

from types import SimpleNamespace

from benchmarks.benchmark import print_table


def figures(prefill, decode, gb_s):
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "bandwidth_GB_s": gb_s, "weight_GB": 1.0}


def test_report(capsys):
    a = SimpleNamespace(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, threads=2, prompt_len=128, gen_len=32)
    res = {
        "ours_bfloat16_b1": figures(150, 11.2, 20.1), "hf_bfloat16_b1": {"prefill_tok_s": 120, "decode_tok_s": 8.0},
        "ours_int8_b1": figures(100, 15.1, 13.0),
        "ours_float32_b1": figures(140, 7.9, 29.0), "hf_float32_b1": {"prefill_tok_s": 100, "decode_tok_s": 5.0},
        "int8_quality": {"top1_agreement": 0.91, "max_abs_logit_error": 0.3, "logit_range": 12.0,
                         "bf16_vs_fp32_top1_agreement": 0.95},
        "read_bandwidth_GB_s": 29.0, "read_bandwidth_samples_GB_s": [26.0, 29.0, 31.0],
        "mp2_decode_tok_s": {"float32": 7.1},
        "build": {"bfloat16": {"build_s": 1.2, "read_s": 0.8, "file_GB": 1.9, "page_cache": "warm"}},
    }
    print_table(res, a)
    out = capsys.readouterr().out
    for heading in ("Llama inference benchmark (CPU)", "Quality of int8", "Model parallelism", "Loading"):
        assert heading in out
    lines = out.splitlines()
    assert "memory read bandwidth 29.0 GB/s" in out and any("tok/s" in line and "GB/s" in line for line in lines)
    bf16 = next(line for line in lines if line.strip().startswith("bf16") and "x" in line.split()[-1])
    assert bf16.split()[1:4] == ["1", "150.0", "11.20"] and bf16.endswith("1.40x")  # 11.2 / 8.0
    assert "7.10 tok/s against 7.90 tok/s (0.90x)" in out
    assert ">=" not in out and "target" not in out
