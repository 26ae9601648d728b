"""Files named by a user or by another file (issue 26, item 3): only regular
files are read, never more than their kind's cap, and every refusal names the
file, what it is and the fix. Covers the helper and each of its callers: the
tokenizer, params.json / sidecars (jsonfile), pipeline.json and manifest.json.
"""

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama.common import userfiles
from llama.common.jsonfile import read_json_object
from llama.common.userfiles import LIMITS, read_user_bytes
from llama.text.tokenizer import Tokenizer, TokenizerError
from llama.weights import manifest, stages
from llama.weights.args import ModelArgs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def refuse(path, match, kind="json", error=ValueError, **kw):
    start = time.monotonic()
    with pytest.raises(error, match=match) as info:
        read_user_bytes(path, kind, fix="give the right file", error=error, **kw)
    assert time.monotonic() - start < 2  # refused at once: nothing was waited for or read to the end
    assert str(info.value).endswith("; give the right file"), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ the helper


def test_reads_a_regular_file_and_follows_links_to_one(tmp_path):
    (tmp_path / "a.json").write_bytes(b'{"x": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert read_user_bytes(tmp_path / "a.json", "json", fix="") == b'{"x": 1}'
    assert read_user_bytes(tmp_path / "link.json", "json", fix="") == b'{"x": 1}'
    assert read_user_bytes(str(tmp_path / "a.json"), "json", fix="", max_bytes=8) == b'{"x": 1}'  # exactly the cap


def test_fifo_is_refused_without_hanging(fifo):
    message = refuse(fifo, r"is a FIFO \(named pipe\), not a regular file")
    assert message.startswith(str(fifo))


def test_devices_directories_and_sockets_are_refused_by_name(tmp_path):
    refuse(Path("/dev/zero"), r"^/dev/zero is a character device, not a regular file")
    refuse(tmp_path, f"^{tmp_path} is a directory, not a regular file")
    (tmp_path / "zero").symlink_to("/dev/zero")  # a link is judged by what it leads to
    refuse(tmp_path / "zero", "zero is a character device")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s"))
        refuse(tmp_path / "s", "s is a socket, not a regular file")
    finally:
        sock.close()


def test_missing_and_dangling_links_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.json not found: put it there"):
        read_user_bytes(tmp_path / "nothing.json", "json", fix="f", missing="put it there")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=r"dangling is a symbolic link to .*gone, which does not exist; f$"):
        read_user_bytes(tmp_path / "dangling", "json", fix="f")


def test_link_loop_and_unreadable_files_are_the_callers_error(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refuse(tmp_path / "loop", r"loop cannot be opened \(Too many levels of symbolic links\)")
    if os.geteuid() != 0:  # root reads anything
        (tmp_path / "secret").write_text("{}")
        (tmp_path / "secret").chmod(0)
        refuse(tmp_path / "secret", r"secret cannot be opened \(Permission denied\)")


def test_size_cap_per_kind(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(LIMITS["json"] + 1)  # sparse: costs no disk
    refuse(big, r"big.json is 1,048,577 bytes, more than the 1,048,576 a JSON file can need")
    with open(big, "wb") as f:
        f.truncate(LIMITS["tokenizer"] + 1)
    refuse(big, "more than the 16,777,216 a tokenizer file can need", kind="tokenizer")
    assert LIMITS["tokenizer"] >= 3 * 5_000_000  # a 256k vocabulary is ~5 MB
    assert LIMITS["dialog"] < LIMITS["tokenizer"]


def test_a_file_growing_past_the_cap_is_read_no_further(tmp_path, monkeypatch):
    """fstat's size is only a first check: a file that grows while it is read
    (or a /proc-like file saying 0) is cut at cap + 1 bytes and refused."""
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 100)
    real_fstat = os.fstat

    def says_empty(fd):
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 0,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr(userfiles.os, "fstat", says_empty)
    refuse(path, "growing grew past the 10 bytes a JSON file can need while it was read", max_bytes=10)
    assert read_user_bytes(path, "json", fix="", max_bytes=100) == b"x" * 100


def test_no_descriptor_is_left_open(tmp_path, fifo):
    before = len(os.listdir("/proc/self/fd"))
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ValueError):
            read_user_bytes(path, "json", fix="f")
    (tmp_path / "ok").write_text("{}")
    read_user_bytes(tmp_path / "ok", "json", fix="f")
    assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------ callers


def test_json_files_refuse_what_is_not_a_file(tmp_path, fifo):
    with pytest.raises(ValueError, match=r"pipe is a FIFO \(named pipe\), not a regular file; fix it"):
        read_json_object(fifo, missing="m", fix="fix it")
    with pytest.raises(ValueError, match=r"/dev/zero is a character device, not a regular file; fix it"):
        read_json_object(Path("/dev/zero"), missing="m", fix="fix it")


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_tokenizer_path_of_a_fifo_or_dev_zero_is_refused_at_once(tmp_path, fifo, target):
    path = fifo if target == "fifo" else Path(target)
    what = "a FIFO" if target == "fifo" else "a character device"
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=f"{path} is {what}.*, not a regular file; pass --tokenizer_path the "
                                             "tokenizer.model file that came with the weights"):
        Tokenizer.from_file(path)
    assert time.monotonic() - start < 2


def test_tokenizer_loads_from_the_bytes_it_read(llama3_tokenizer_path, sp_tokenizer_path, tmp_path):
    """SentencePiece and tiktoken get the bytes read through the helper, so a
    link to a real tokenizer still loads, and the file is opened once."""
    (tmp_path / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    assert Tokenizer.from_file(tmp_path / "tokenizer.model").n_words == 128256
    sp = Tokenizer.from_file(sp_tokenizer_path)
    assert sp.decode(sp.encode("Hello world", bos=False, eos=False)) == "Hello world"


def test_tokenizer_too_large_is_refused_before_reading(tmp_path):
    path = tmp_path / "tokenizer.model"
    with open(path, "wb") as f:
        f.truncate(LIMITS["tokenizer"] + 1)
    with pytest.raises(TokenizerError, match="is 16,777,217 bytes, more than the 16,777,216 a tokenizer file"):
        Tokenizer.from_file(path)


def test_bpe_sidecar_that_is_a_fifo_is_refused(tmp_path, llama3_tokenizer_path):
    (tmp_path / "tokenizer.model").write_bytes(llama3_tokenizer_path.read_bytes()[:2000].rsplit(b"\n", 1)[0] + b"\n")
    os.mkfifo(tmp_path / "tokenizer.model.json")
    with pytest.raises(TokenizerError, match=r"tokenizer.model.json is a FIFO .*; convert the model again"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")


def write_record(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / stages.NAME).write_text(text)
    return folder


def test_pipeline_json_is_capped_and_checked(tmp_path):
    good = write_record(tmp_path / "good", stages.stage_record(1, 2, ModelArgs(n_layers=4, vocab_size=32000), 1))
    assert stages.read_record(good)["layers"] == [2, 4] and stages.read_record(good)["split"] == "cost"
    assert stages.read_record(tmp_path) is None  # no pipeline.json: a whole checkpoint
    fix = "split the checkpoint again with utils/shard_model_checkpoint.py --pipeline_stages N"
    big = write_record(tmp_path / "big", '{"stage": 0, "pad": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(ValueError, match=r"pipeline.json is 2,097,1\d\d bytes, more than the 1,048,576 a JSON file "
                                         r"can need; " + fix):
        stages.read_record(big)
    deep = write_record(tmp_path / "deep", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"pipeline.json is not valid JSON \(nested too deeply\); " + fix):
        stages.read_record(deep)
    for bad in ('{"stage": 0, "stages": 2, "layers": [0], "n_layers": 4}', '{"stage": true, "stages": 2, '
                '"layers": [0, 2], "n_layers": 4}', '{"stage": 0, "stages": 2, "layers": [3, 1], "n_layers": 4}',
                '[1, 2]', '{"stage": 0, "stages": 2, "layers": [0, 2], "n_layers": NaN}',
                '{"stage": 0, "stages": 2, "layers": [0, 2], "n_layers": 4, "split": "by hand"}'):
        with pytest.raises(ValueError, match=fix):
            stages.read_record(write_record(tmp_path / "bad", bad))


def test_pipeline_json_that_is_not_a_file_is_refused_not_ignored(tmp_path):
    (tmp_path / "stage0").mkdir()
    (tmp_path / "stage0" / stages.NAME).symlink_to("/dev/zero")
    assert list(stages.stage_folders(tmp_path)) == [0]
    with pytest.raises(ValueError, match=r"stage0/pipeline.json is a character device, not a regular file; split"):
        stages.stage_folder(tmp_path, 1, 0, ModelArgs(n_layers=4, vocab_size=32000))


def test_manifest_linked_to_dev_zero_says_what_it_is(tmp_path):
    (tmp_path / manifest.NAME).symlink_to("/dev/zero")
    with pytest.raises(manifest.ManifestError, match=r"manifest.json is a character device, not a regular file; "
                                                     r"delete .*manifest.json if you trust the other files"):
        manifest.read_manifest(tmp_path)
    (tmp_path / manifest.NAME).unlink()
    (tmp_path / manifest.NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(FileNotFoundError, match=r"manifest.json is a symbolic link to .*elsewhere.json, which does "
                                                r"not exist: delete .* if you trust the other files"):
        manifest.read_manifest(tmp_path)
    (tmp_path / manifest.NAME).unlink()
    (tmp_path / manifest.NAME).write_text(manifest.manifest_text({"a": {"size": -1, "fingerprint": "x"}}, True))
    with pytest.raises(manifest.ManifestError, match="is not a manifest this version writes"):
        manifest.read_manifest(tmp_path)


WORST = """
import sys, time
from pathlib import Path
from llama.text.tokenizer import Tokenizer
from llama.chat.dialog_file import load_dialog
path, kind = Path(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
try:
    Tokenizer.from_file(path) if kind == "tokenizer" else load_dialog(path)
except ValueError as e:
    print(type(e).__name__, str(e)[:80])
# VmHWM: this process's peak (ru_maxrss would keep the forking pytest's across exec)
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(time.perf_counter() - start, peak // 1024)
"""


@pytest.mark.parametrize("kind", ["tokenizer", "dialog"])
def test_worst_files_end_fast_and_small(tmp_path, kind):
    """The costliest file of each kind under its cap is refused within 5 s and
    500 MB, measured in a fresh process: a dialog of the cap's size made of
    nested lists; a tokenizer of the cap's size whose ~1M ranks all parse but
    leave a gap (so the error comes after the whole file is read)."""
    if kind == "dialog":
        path, item = tmp_path / "worst.json", "[" * 10 + "]" * 10
        path.write_text("[" + ",".join([item] * ((LIMITS["dialog"] - 2) // (len(item) + 1))) + "]")
    else:
        path, lines, size = tmp_path / "tokenizer.model", [], 0
        for i in range(1, 1 << 24):  # rank 0 is missing
            line = base64.b64encode(i.to_bytes(4, "little")) + b" %d\n" % i
            if size + len(line) > LIMITS["tokenizer"]:
                break
            lines.append(line)
            size += len(line)
        path.write_bytes(b"".join(lines))
    run = subprocess.run([sys.executable, "-c", WORST, str(path), kind], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].split()[0] in ("TokenizerError", "DialogFileError"), run.stdout
    seconds, peak_mb = float(lines[-1].split()[0]), int(lines[-1].split()[1])
    print(f"{kind}: {seconds:.2f} s, {peak_mb} MB peak")
    assert seconds < 5 and peak_mb < 500, run.stdout
