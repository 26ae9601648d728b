"""benchmarks/llamacpp_peer.py: cache names that follow the checkpoint, a clear
message without llama-cpp-python, and (where llama-cpp-python is installed,
which CI does not do) llama.cpp running our exported weights to the same
greedy tokens as our model."""

import sys

import pytest

from benchmarks.llamacpp_peer import checkpoint_key, import_llama_cpp, peer_files


def test_cache_key_follows_params_and_weights(tiny_gguf, tmp_path):
    import shutil

    _, ckpt = tiny_gguf
    copy = tmp_path / ckpt.name
    shutil.copytree(ckpt, copy)
    key = checkpoint_key(copy)
    assert key.startswith(ckpt.name + "-") and key == checkpoint_key(copy)
    params = copy / "params.json"
    params.write_text(params.read_text().replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
    assert checkpoint_key(copy) != key
    key = checkpoint_key(copy)
    with open(copy / "consolidated.00.pth", "ab") as f:
        f.write(b"\0")
    assert checkpoint_key(copy) != key


def test_missing_llama_cpp_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e "\.\[bench\]"'):
        import_llama_cpp()


def test_llama_cpp_runs_our_weights_to_the_same_greedy_tokens(tiny_gguf, tmp_path):
    """Needs llama-cpp-python (the `bench` extra; not installed in CI, where this is skipped)."""
    pytest.importorskip("llama_cpp")
    from benchmarks.llamacpp_peer import LlamaCppRunner
    from conftest import build_tiny

    import torch

    from utils.make_random_checkpoint import make_random_checkpoint, random_params

    template, _ = tiny_gguf  # its vocabulary: 275 tokens
    params = random_params("llama3", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=275)
    ckpt = make_random_checkpoint(tmp_path / "ckpt", params, template.parent / "ckpt" / "tokenizer.model",
                                  dtype=torch.float32, seed=1)
    files = peer_files(ckpt, template, threads=1, cache=tmp_path, log=lambda msg: None)
    assert sorted(files) == ["BF16", "F32", "Q4_1", "Q8_0"] and all(p.is_file() for p in files.values())
    gen = build_tiny(ckpt, max_seq_len=64, max_batch_size=1)
    gen.tokenizer.stop_tokens = frozenset()
    prompt = gen.tokenizer.encode("the llama", bos=True, eos=False)
    ours = gen.generate([prompt], 24, temperature=0)[0][0]
    runner = LlamaCppRunner(files["F32"], threads=1, n_ctx=64)
    assert len(set(ours)) > 5  # not one token repeated: a real comparison
    assert runner.greedy(prompt, 24) == ours
    assert runner.tokenize(" the llama") == gen.tokenizer.encode(" the llama", bos=False, eos=False)
    timing = runner.decode(prompt, 8)
    assert timing["decode_ms"] > 0 and timing["decode_wall_ms"] > 0
    assert runner.prefill(prompt)["prefill_ms"] > 0
