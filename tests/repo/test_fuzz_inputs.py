"""Property-based fuzzing (Hypothesis) of every input kind a user or an
attacker controls: params.json, tokenizer sidecars, GGUF headers, checkpoint
folders, dialogs, tool-call text and calculator expressions (issue 13).

Each property: the input is accepted, or refused with our own error type
(a ValueError subclass, FileNotFoundError) and a message, within a per-example
deadline; never another exception, a hang, or a change outside the output.
Budgets (max_examples) keep the whole file well under a minute on 2 cores.
"""

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import fields
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama.weights.args import ModelArgs
from llama.text.chat_format import ChatFormat, StopReason
from llama.weights.checkpoint import load_rank_state
from llama.chat.local_tools import calculate
from llama.text.tokenizer import Tokenizer, TokenizerError
from llama.text.tool_calls import parse_tool_call

# LLAMA_FUZZ_SCALE=20 runs 20 times as many examples, with fresh random ones (a longer campaign).
SCALE = int(os.environ.get("LLAMA_FUZZ_SCALE", 1))
FUZZ = settings(deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow,
                HealthCheck.function_scoped_fixture, HealthCheck.data_too_large], derandomize=SCALE == 1,
                database=None)

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "vocab_size": 256}


def refused_well(e: BaseException, kinds=(ValueError, FileNotFoundError)) -> None:
    """Our own error type, with a message a person can act on."""
    assert isinstance(e, kinds), f"{type(e).__name__}: {e}"
    assert len(str(e)) > 10, repr(e)


def tree_digest(root: Path) -> str:
    """A digest of every file's name and bytes under `root`: proves nothing else changed."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)


# ------------------------------------------------------------------ params.json


PARAM_KEYS = [f.name for f in fields(ModelArgs)] + ["rope_scaling", "vocab"]


@settings(FUZZ, max_examples=150 * SCALE)
@given(st.dictionaries(st.sampled_from(PARAM_KEYS), json_values, max_size=6))
def test_params_json_values(tmp_path_factory, changes):
    path = tmp_path_factory.mktemp("params") / "params.json"
    path.write_text(json.dumps({**TINY, **changes}))  # json.dumps writes NaN / Infinity as Python reads them
    try:
        args = ModelArgs.from_json(path)
    except Exception as e:
        refused_well(e)
        return
    assert math.isfinite(args.norm_eps) and isinstance(args.use_scaled_rope, bool)
    assert 0 < args.ffn_hidden_dim and args.n_layers <= 4096


@settings(FUZZ, max_examples=60 * SCALE)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
                 st.integers(1, 200_000).map(lambda n: '{"dim":' * n + "1" + "}" * n)))
def test_params_json_text(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("params") / "params.json"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    try:
        ModelArgs.from_json(path)
    except Exception as e:
        refused_well(e)


# ------------------------------------------------------------------ tokenizer sidecar


HOSTILE_PATTERNS = ["", "a*", "(?:)", r"\w+", ".", r"(a+)+$", "[", r"\p{L}+|\s+|\S", r"(?=x)", r"\s+|\S+", "x{99999}"]


@settings(FUZZ, max_examples=60 * SCALE)
@given(st.dictionaries(st.sampled_from(["version", "pattern", "special_tokens", "bos_id", "eos_id", "pad_id", "add_bos",
                                        "stop_tokens", "chat_format", "default_system_prompt", "extra"]),
                       json_values | st.sampled_from(HOSTILE_PATTERNS), max_size=3),
       st.text(max_size=40))
def test_tokenizer_sidecar(tiny_gguf, tmp_path_factory, changes, text):
    folder = tmp_path_factory.mktemp("sidecar")
    shutil.copy(tiny_gguf[1] / "tokenizer.model", folder / "tokenizer.model")
    meta = json.loads((tiny_gguf[1] / "tokenizer.model.json").read_text())
    (folder / "tokenizer.model.json").write_text(json.dumps({**meta, **changes}))
    try:
        tok = Tokenizer.from_file(folder / "tokenizer.model")
    except Exception as e:
        refused_well(e, (TokenizerError, FileNotFoundError))
        return
    ids = tok.encode(text, bos=True, eos=True)  # a tokenizer that loads encodes anything
    assert all(isinstance(i, int) for i in ids) and isinstance(tok.decode(ids), str)


# ------------------------------------------------------------------ GGUF headers


@pytest.fixture(scope="module")
def gguf_bytes(tiny_gguf):
    return tiny_gguf[0].read_bytes()


@settings(FUZZ, max_examples=40 * SCALE)
@given(st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, 480_000)))
def test_gguf_header_bytes(gguf_bytes, tmp_path_factory, flips, cut):
    from utils.convert_gguf_checkpoint import convert

    data = bytearray(gguf_bytes)
    for offset, value in flips:
        data[offset] = value
    if cut is not None:
        data = data[:cut]
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "m.gguf").write_bytes(bytes(data))
    try:
        convert(folder / "m.gguf", folder / "out")
    except Exception as e:
        refused_well(e)
        out = folder / "out"
        assert not out.exists() or not any(p.name.endswith(".pth") for p in out.iterdir())
    assert (folder / "m.gguf").read_bytes() == bytes(data)  # the input is never changed


# ------------------------------------------------------------------ checkpoint folders


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A 2-shard checkpoint with a 256-token vocabulary (a few hundred KB: cheap to copy per example)."""
    from utils.make_random_checkpoint import make_random_checkpoint, random_params

    params = random_params("llama3", **{k: v for k, v in TINY.items()})
    return make_random_checkpoint(tmp_path_factory.mktemp("small"), params, n_shards=2, force=True)


def hostile_tensor(kind: str):
    return {
        "stride0": lambda: torch.zeros(1).expand(2**33),
        "sparse": lambda: torch.sparse_coo_tensor(torch.tensor([[10**9]]), torch.tensor([1.0]), (64,),
                                                  check_invariants=False),
        "int": lambda: torch.zeros(64, dtype=torch.int64),
        "bool": lambda: torch.zeros(64, dtype=torch.bool),
        "shape": lambda: torch.zeros(3, 5),
        "empty": lambda: torch.zeros(0),
    }[kind]()


operations = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(["consolidated.00.pth", "consolidated.01.pth", "params.json",
                                                   "manifest.json"])),
    st.tuples(st.just("truncate"), st.sampled_from(["consolidated.00.pth", "consolidated.01.pth"]), st.integers(0, 4000)),
    st.tuples(st.just("garbage"), st.sampled_from(["consolidated.01.pth", "manifest.json", "params.json"]),
              st.binary(max_size=200)),
    st.tuples(st.just("stray"), st.from_regex(r"consolidated\.[0-9]{1,25}\.pth", fullmatch=True)),
    st.tuples(st.just("dir"), st.sampled_from(["consolidated.00.pth", "consolidated.01.pth", "params.json"])),
    st.tuples(st.just("loop"), st.sampled_from(["consolidated.00.pth", "consolidated.01.pth"])),
    st.tuples(st.just("param"), st.sampled_from(PARAM_KEYS), json_values),
    st.tuples(st.just("tensor"), st.sampled_from(["consolidated.00.pth", "consolidated.01.pth"]),
              st.sampled_from(["norm.weight", "layers.0.attention.wq.weight", "output.weight", "extra"]),
              st.sampled_from(["stride0", "sparse", "int", "bool", "shape", "empty"])),
    st.tuples(st.just("swap"),),
)


def apply(folder: Path, op) -> None:
    kind, target = op[0], folder / op[1] if len(op) > 1 and isinstance(op[1], str) else None
    if kind == "delete":
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    elif kind == "truncate" and target.is_file():
        data = target.read_bytes()
        target.write_bytes(data[: op[2]])
    elif kind == "garbage":
        if not target.is_dir():
            target.unlink(missing_ok=True)
            target.write_bytes(op[2])
    elif kind == "stray":
        target.write_bytes(b"x")
    elif kind in ("dir", "loop"):
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        target.mkdir() if kind == "dir" else target.symlink_to(target.name)
    elif kind == "param" and (folder / "params.json").is_file():
        try:
            params = json.loads((folder / "params.json").read_text())
        except ValueError:
            return
        if isinstance(params, dict):
            params[op[1]] = op[2]
            (folder / "params.json").write_text(json.dumps(params))
    elif kind == "tensor" and target.is_file() and not target.is_symlink():
        try:
            state = torch.load(target, weights_only=True)
        except Exception:
            return
        state[op[2]] = hostile_tensor(op[3])
        target.unlink()
        torch.save(state, target)
    elif kind == "swap":
        a, b = folder / "consolidated.00.pth", folder / "consolidated.01.pth"
        if a.is_file() and b.is_file() and not a.is_symlink() and not b.is_symlink():
            a.rename(folder / "x")
            b.rename(a)
            (folder / "x").rename(b)


@settings(FUZZ, max_examples=60 * SCALE)
@given(st.lists(operations, min_size=1, max_size=3), st.sampled_from([1, 2]))
def test_checkpoint_folders(small_ckpt, tmp_path_factory, ops, world_size):
    root = tmp_path_factory.mktemp("fuzzckpt")
    folder = root / "ckpt"
    shutil.copytree(small_ckpt, folder, symlinks=True)
    outside = root / "outside.txt"
    outside.write_text("precious")
    for op in ops:
        apply(folder, op)
    before = tree_digest(folder)
    start = time.perf_counter()
    try:
        args = ModelArgs.from_json(folder / "params.json", max_seq_len=32, max_batch_size=1)
        for rank in range(world_size):
            state, _ = load_rank_state(folder, args, rank, world_size, args.vocab_size)
            for t in state.values():  # touching every loaded tensor is safe
                assert t.layout == torch.strided and t.numel() * t.element_size() < 2**24
                t.sum()
    except Exception as e:
        refused_well(e, (ValueError, FileNotFoundError))  # CheckpointError is a ValueError
    assert time.perf_counter() - start < 3
    assert tree_digest(folder) == before and outside.read_text() == "precious"


# ------------------------------------------------------------------ dialogs


@pytest.fixture(scope="module")
def formats(llama3_tokenizer_path, sp_tokenizer_path, tiny_gguf):
    return [ChatFormat.for_tokenizer(Tokenizer.from_file(p))
            for p in (llama3_tokenizer_path, sp_tokenizer_path, tiny_gguf[1] / "tokenizer.model")]


hostile_text = st.one_of(st.text(max_size=60), st.sampled_from([
    "[INST]", "<<SYS>>", "<|eot_id|>", "<|python_tag|>", "<|im_end|>", "\ud800", "a\udcff", "\x00", " " * 30_000,
]))
messages = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "ipython", "tool", "", "USER"]),
     "content": st.one_of(hostile_text, st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2))},
    optional={"tool_calls": st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=2)),
              "stop_reason": st.one_of(st.sampled_from([r.value for r in StopReason]), st.text(max_size=5))},
)


@settings(FUZZ, max_examples=150 * SCALE)
@given(st.one_of(st.lists(messages, max_size=4), json_values))
def test_dialogs(formats, dialog):
    for fmt in formats:
        try:
            tokens = fmt.encode_dialog_prompt(dialog)
        except Exception as e:
            refused_well(e, (ValueError, TypeError))  # DialogError is a ValueError
            continue
        assert all(isinstance(t, int) and 0 <= t < fmt.tokenizer.n_words for t in tokens)


# ------------------------------------------------------------------ tool-call text


call_text = st.one_of(
    st.text(max_size=80),
    st.builds(lambda name, args: f'<function={name}>{args}</function>', st.text(max_size=10), st.text(max_size=40)),
    st.builds(lambda v: json.dumps({"name": "f", "parameters": v}), json_values),
    st.builds(lambda q: f"brave_search.call(query={q})", st.text(max_size=30)),
    st.integers(1, 5000).map(lambda n: "brave_search.call(query=" + "(" * n + "1" + ")" * n + ")"),
    st.integers(1, 100_000).map(lambda n: "{" + '"a":[' * n + "]" * n + "}"),
)


@settings(FUZZ, max_examples=150 * SCALE)
@given(call_text, st.booleans())
def test_tool_call_text(formats, text, python_tag):
    call = parse_tool_call(text, python_tag)  # never raises
    assert call is None or isinstance(call.tool_name, str)
    fmt = formats[0]
    tag = fmt.tokenizer.special_tokens["<|python_tag|>"]
    tokens = fmt.tokenizer.encode(text, bos=False, eos=False)
    message = fmt.decode_assistant_message(([tag] if python_tag else []) + tokens, StopReason.END_OF_MESSAGE)
    assert message["role"] == "assistant"


# ------------------------------------------------------------------ calculator


numbers = st.one_of(st.integers(-10**30, 10**30).map(str), st.sampled_from(
    ["10**8", "10**10**10", "9**9**9", "-10**8", "1e308", "1e999", "0.5", "-1", "0", "2**9999", "nan", "pi"]))
expressions = st.recursive(
    numbers,
    lambda inner: st.one_of(
        st.builds(lambda a, op, b: f"({a}){op}({b})", inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^"]),
                  inner),
        st.builds(lambda f, a: f"{f}({a})", st.sampled_from(["sqrt", "exp", "log", "abs", "floor", "ceil", "sin"]), inner),
        st.builds(lambda a, b: f"round({a}, {b})", inner, inner),
        st.builds(lambda a: f"-({a})", inner),
    ),
    max_leaves=8,
)


@settings(FUZZ, max_examples=300 * SCALE)
@given(st.one_of(expressions, st.text(max_size=60)))
def test_calculator_always_ends_quickly(expression):
    start = time.perf_counter()
    result = calculate(expression)
    assert time.perf_counter() - start < 0.5, expression
    assert isinstance(result, str) and len(result) <= 4000
