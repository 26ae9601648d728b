"""Builds the worst hostile input of one class and feeds it to the code that
must refuse it; prints the seconds until the error and the error itself.

    python benchmarks/hostile_inputs.py --list
    python benchmarks/peak_memory.py -- python benchmarks/hostile_inputs.py stride0 --ckpt CKPT

CKPT is a checkpoint folder with its tokenizer.model (make one with
utils/make_random_checkpoint.py --out CKPT --tokenizer tokenizer.model
--dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2); it is copied, never changed.
Peak memory is that of the whole process (Python, torch and the copy included).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _copy(ckpt: Path, tmp: Path) -> Path:
    dst = tmp / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def _build(folder: Path, tokenizer: Path, **kw):
    from llama import Llama

    kw = {"max_seq_len": 64, "max_batch_size": 1, "device": "cpu", "dtype": "float32", **kw}
    return Llama.build(str(folder), str(tokenizer), **kw)


def _params(folder: Path, **changes) -> None:
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, **changes}))


def _replace_tensor(path: Path, key: str, tensor) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    state[key] = tensor
    torch.save(state, path)


def case_shard_index(ckpt, tmp):
    """A stray consolidated.99999999999999999999.pth next to the shards."""
    folder = _copy(ckpt, tmp)
    (folder / "consolidated.99999999999999999999.pth").write_bytes(b"x")
    return lambda: _build(folder, folder / "tokenizer.model")


def case_n_layers(ckpt, tmp):
    """params.json with n_layers 10**9."""
    folder = _copy(ckpt, tmp)
    _params(folder, n_layers=10**9)
    return lambda: _build(folder, folder / "tokenizer.model")


def case_deep_json(ckpt, tmp):
    """params.json nested 500,000 levels deep (1 MB)."""
    folder = _copy(ckpt, tmp)
    (folder / "params.json").write_text("[" * 500_000 + "]" * 500_000)
    return lambda: _build(folder, folder / "tokenizer.model")


def case_stride0(ckpt, tmp):
    """A shard tensor of 2**33 float32 elements (32 GiB) over a 4-byte storage, stride 0."""
    import torch

    folder = _copy(ckpt, tmp)
    _replace_tensor(folder / "consolidated.00.pth", "norm.weight", torch.zeros(1).expand(2**33))
    return lambda: _build(folder, folder / "tokenizer.model")


def case_sparse(ckpt, tmp):
    """A sparse COO tensor whose index points 10**9 elements past its end."""
    import torch

    folder = _copy(ckpt, tmp)
    bad = torch.sparse_coo_tensor(torch.tensor([[10**9]]), torch.tensor([1.0]), (64,), check_invariants=False)
    _replace_tensor(folder / "consolidated.00.pth", "norm.weight", bad)
    return lambda: _build(folder, folder / "tokenizer.model")


def case_max_seq_len(ckpt, tmp):
    """--max_seq_len 10**9 (the KV cache would need hundreds of GiB)."""
    return lambda: _build(ckpt, ckpt / "tokenizer.model", max_seq_len=10**9)


def case_mixed(ckpt, tmp):
    """A folder whose second shard comes from another checkpoint of the same shape."""
    folder = _copy(ckpt, tmp)
    shards = sorted(folder.glob("consolidated.*.pth"))
    data = bytearray(shards[-1].read_bytes())
    data[-100] ^= 1  # another checkpoint's bytes: same size, other contents
    shards[-1].write_bytes(bytes(data))
    return lambda: _build(folder, folder / "tokenizer.model")


def case_gguf_block_count(ckpt, tmp):
    """A GGUF whose metadata says block_count 10**9 (needs tests/gguf_reference.py and gguf)."""
    sys.path.insert(0, str(REPO / "tests"))
    from gguf_reference import write_tiny_gguf

    from utils.convert_gguf_checkpoint import convert

    write_tiny_gguf(tmp / "m.gguf", extra_kv={"llama.block_count": ("uint32", 10**9)})
    return lambda: convert(tmp / "m.gguf", tmp / "out")


def case_gguf_truncated(ckpt, tmp):
    """A GGUF cut to its first 500 bytes."""
    sys.path.insert(0, str(REPO / "tests"))
    from gguf_reference import write_tiny_gguf

    from utils.convert_gguf_checkpoint import convert

    write_tiny_gguf(tmp / "m.gguf")
    (tmp / "t.gguf").write_bytes((tmp / "m.gguf").read_bytes()[:500])
    return lambda: convert(tmp / "t.gguf", tmp / "out")


def case_calculator(ckpt, tmp):
    """The calculator given round(1, -10**8), 10**10**10 and 9**9**9."""
    from llama.chat.local_tools import calculate

    def run():
        results = [calculate(e) for e in ("round(1, -10**8)", "10**10**10", "9**9**9")]
        raise ValueError("; ".join(results))

    return run


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", choices=sorted(CASES))
    parser.add_argument("--ckpt", type=Path, help="a small checkpoint folder with its tokenizer.model")
    parser.add_argument("--list", action="store_true")
    a = parser.parse_args()
    if a.list or a.case is None:
        for name, fn in sorted(CASES.items()):
            print(f"{name:18} {fn.__doc__}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        attempt = CASES[a.case](a.ckpt, Path(tmp))
        start = time.perf_counter()
        try:
            attempt()
        except (ValueError, FileNotFoundError) as e:
            print(f"{a.case}: refused after {time.perf_counter() - start:.3f} s: {type(e).__name__}: {str(e)[:300]}")
            return 0
    print(f"{a.case}: NOT refused")
    return 1


if __name__ == "__main__":
    sys.exit(main())
