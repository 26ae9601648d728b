"""Property-based fuzzing (Hypothesis) of the parsers of files that come with
a checkpoint or from a user (issue 26): dialog files (/load), a stage
folder's pipeline.json and a checkpoint's manifest.json.

Each property: any bytes, or any JSON-ish structure shaped like the real
file, gives either a parsed result of the documented shape or the
documented error type (DialogFileError, ValueError, ManifestError) with a
message naming the file; never another exception, and within the deadline.
Settings follow tests/repo/test_fuzz_inputs.py (LLAMA_FUZZ_SCALE for longer
campaigns); the whole file runs in a few seconds.
"""

import json
import os
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama.chat.dialog_file import DialogFileError, load_dialog
from llama.text.chat_format import ChatFormat
from llama.text.messages import StopReason
from llama.text.tokenizer import Tokenizer
from llama.weights import manifest, stages

SCALE = int(os.environ.get("LLAMA_FUZZ_SCALE", 1))
FUZZ = settings(deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow,
                HealthCheck.function_scoped_fixture, HealthCheck.data_too_large], derandomize=SCALE == 1,
                database=None)

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                              max_size=3), max_leaves=8)
# Bytes that are sometimes JSON: raw bytes, text, or a JSON value cut or spliced.
noisy = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                  st.builds(lambda v, cut: json.dumps(v).encode()[:cut], json_values, st.integers(0, 200)),
                  st.sampled_from([b"[" * 5000, b"{" * 5000 + b"}" * 5000, b'{"a": NaN}', b"\xff\xfe", b"",
                                   b"[" * 100_000 + b"]" * 100_000]))


def write(folder, name: str, content) -> None:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / name).write_bytes(data)


def refused_well(e: BaseException, kinds) -> None:
    """The documented error type, with a message a person can act on."""
    assert isinstance(e, kinds), f"{type(e).__name__}: {e}"
    assert len(str(e)) > 10, repr(e)


# ------------------------------------------------------------------ dialog files


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    return ChatFormat.for_tokenizer(Tokenizer.from_file(llama3_tokenizer_path))


tool_call = st.fixed_dictionaries(
    {"tool_name": st.one_of(st.sampled_from(["calculator", "brave_search", "code_interpreter", ""]), json_values)},
    optional={"arguments": st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values),
              "call_id": st.one_of(st.text(max_size=5), json_values),
              "syntax": st.one_of(st.sampled_from(["builtin", "code", "json", "plain_json", "function_tag"]),
                                  json_values),
              "text": st.one_of(st.none(), st.text(max_size=20), json_values),
              "extra": json_values})
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "ipython"]), json_values),
     "content": st.one_of(st.text(max_size=30), json_values)},
    optional={"tool_calls": st.one_of(st.lists(st.one_of(tool_call, json_values), max_size=2), json_values),
              "stop_reason": st.one_of(st.sampled_from([r.value for r in StopReason]), json_values)})


def check_dialog_file(folder, content, llama3) -> None:
    write(folder, "d.json", content)
    try:
        dialog = load_dialog(folder / "d.json")
    except Exception as e:
        refused_well(e, DialogFileError)
        assert str(folder / "d.json") in str(e)
        return
    assert isinstance(dialog, list) and all(isinstance(m["content"], str) for m in dialog)
    try:  # what /load does next: the chat format judges roles and order, with ValueErrors only
        llama3.encode_dialog_prompt(dialog + [{"role": "user", "content": "?"}])
    except Exception as e:
        refused_well(e, ValueError)


@settings(FUZZ, max_examples=100 * SCALE)
@given(noisy)
def test_dialog_file_bytes(tmp_path_factory, llama3, content):
    check_dialog_file(tmp_path_factory.mktemp("dialog"), content, llama3)


@settings(FUZZ, max_examples=150 * SCALE)
@given(st.one_of(st.lists(message, max_size=4), json_values))
def test_dialog_file_structures(tmp_path_factory, llama3, content):
    check_dialog_file(tmp_path_factory.mktemp("dialog"), content, llama3)


# ------------------------------------------------------------------ pipeline.json


small_ints = st.one_of(st.integers(-2, 6), json_values)
record = st.fixed_dictionaries({}, optional={
    "stage": small_ints, "stages": small_ints, "n_layers": small_ints, "shards": small_ints,
    "layers": st.one_of(st.lists(small_ints, max_size=3), json_values),
    "split": st.one_of(st.sampled_from(["cost", "even", "by hand"]), json_values)})


def check_record(folder, content) -> None:
    write(folder, stages.NAME, content)
    try:
        data = stages.read_record(folder)
    except Exception as e:
        refused_well(e, ValueError)
        assert str(folder / stages.NAME) in str(e)
        return
    start, stop = data["layers"]
    assert 0 <= data["stage"] < data["stages"] and 0 <= start <= stop <= data["n_layers"]
    try:  # the one caller: which folder and layers a stage loads
        from llama.weights.args import ModelArgs

        stages.stage_folder(folder, data["stages"], data["stage"], ModelArgs(n_layers=data["n_layers"], vocab_size=512))
    except Exception as e:
        refused_well(e, ValueError)


@settings(FUZZ, max_examples=100 * SCALE)
@given(st.one_of(noisy, record, json_values))
def test_pipeline_json(tmp_path_factory, content):
    check_record(tmp_path_factory.mktemp("stage"), content)


# ------------------------------------------------------------------ manifest.json


entry = st.one_of(st.fixed_dictionaries({}, optional={"size": small_ints, "fingerprint": st.one_of(st.text(max_size=4),
                                                                                                   json_values)}),
                  json_values)
manifest_doc = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(manifest.VERSION), json_values), "complete": st.one_of(st.booleans(), json_values),
    "files": st.one_of(st.dictionaries(st.sampled_from(["consolidated.00.pth", "x", "../y", ".z", "a/b"]), entry,
                                       max_size=3), json_values)})


@settings(FUZZ, max_examples=100 * SCALE)
@given(st.one_of(noisy, manifest_doc, json_values))
def test_manifest_json(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "consolidated.00.pth").write_bytes(b"weights")
    write(folder, manifest.NAME, content)
    try:
        data = manifest.read_manifest(folder)
    except Exception as e:
        refused_well(e, manifest.ManifestError)
        assert str(folder / manifest.NAME) in str(e)
        return
    assert isinstance(data["files"], dict) and isinstance(data["complete"], bool)
    try:  # the check every load makes
        manifest.check_folder(folder, ["consolidated.00.pth"])
    except Exception as e:
        refused_well(e, manifest.ManifestError)
