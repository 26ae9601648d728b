"""benchmarks/quantized_load.py: an end-to-end run on the "tiny" shape with
llama-cpp-python hidden (its rows must say "not installed", not vanish), the
KV cache arithmetic, and the random int4 writer the "8b" shape uses. No
figure is asserted: the timings are the script's output, not a test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import quantized_load
from conftest import CACHE

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = CACHE / "SmolLM2-135M-Instruct" / "tokenizer.model"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"{TOKENIZER} not downloaded (quickstart.sh)")


@needs_tokenizer
def test_tiny_run_without_llama_cpp_says_not_installed(tmp_path):
    hide = tmp_path / "hide" / "llama_cpp"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("hidden by the test")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide.parent), str(REPO)]),
           "LLAMA_BENCH_CACHE": str(tmp_path / "cache"), "LLAMA_TEST_CACHE": str(CACHE)}
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quantized_load.py"), "--shape", "tiny", "--rounds", "1",
           "--prompt_len", "8", "--gen_len", "4", "--prefill_len", "32", "--n_ctx", "64", "--json", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "flags:" in run.stdout and "| engine | type |" in run.stdout
    assert "making" in run.stderr and (tmp_path / "cache" / "quantized" / "tiny" / "int4" / "params.json").is_file()
    rows = {(r["engine"], r["type"]): r for r in json.loads(out.read_text())["rows"]}
    for name in ("bf16", "int8", "int4", "int4 at load"):
        row = rows[("ours", name)]
        assert "error" not in row, row
        assert row["load_s"] > 0 and row["VmHWM"] > 0 and row["file_bytes"] > 0 and row["kv_bytes"] > 0
    for name in ("bf16", "int8", "int4"):
        assert rows[("ours", name)]["decode_ms"] > 0 and rows[("ours", name)]["prefill_ms"] > 0
    assert "decode_ms" not in rows[("ours", "int4 at load")]  # load figures only: its speed is int4's
    assert rows[("ours", "int4")]["file_bytes"] < rows[("ours", "int8")]["file_bytes"] < rows[("ours", "bf16")]["file_bytes"]
    for kind in quantized_load.THEIRS:
        assert rows[("llama.cpp", kind)]["error"] == "not installed"
    assert run.stdout.count("not installed") == len(quantized_load.THEIRS)


def test_kv_bytes_counts_k_and_v_of_every_layer(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8}))
    assert quantized_load.kv_bytes(tmp_path, 1024) == 2 * 32 * 1024 * 8 * 128 * 2  # 128 MiB
    (tmp_path / "params.json").write_text(json.dumps({"dim": 2048, "n_layers": 24, "n_heads": 32}))
    assert quantized_load.kv_bytes(tmp_path, 1024) == 2 * 24 * 1024 * 32 * 64 * 2


@needs_tokenizer
def test_random_int4_checkpoint_is_stored_int4(tmp_path):
    from llama.weights import quantized
    from llama.weights.random_weights import random_params

    params = random_params("llama3", 256, 1, 4, 2, 49152, 256)
    out = quantized_load.random_int4_checkpoint(tmp_path / "ckpt", params, TOKENIZER)
    state = torch.load(out / "consolidated.00.pth", mmap=True, weights_only=True)
    saved = json.loads((out / "params.json").read_text())
    assert saved[quantized.PARAMS_KEY]["method"] == "int4" and (out / "tokenizer.model").is_file()
    wq, scales = state["layers.0.attention.wq.weight"], state["layers.0.attention.wq.scales"]
    assert quantized.stored_type("layers.0.attention.wq.weight", wq, scales, 256) == "q4_1"
    assert quantized.stored_type("output.weight", state["output.weight"], state["output.scales"], 256) == "q8_0"
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16
    assert torch.isfinite(state["tok_embeddings.weight"].float()).all() and state["norm.weight"].eq(1).all()
    w = quantized.dequantize("q4_1", wq, scales)  # activations stay O(1): rows of about unit norm, centred
    assert 0.3 < w.norm(dim=1).mean().item() < 3 and w.mean().abs().item() < 0.05
