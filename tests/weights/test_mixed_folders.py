"""Folders that mix two checkpoints, overwrites interrupted between renames,
planted symbolic links and full disks (issue 13): the loader names the files
that disagree, and the writers never leave a folder that loads as a mix."""

import errno
import json
import os
import shutil

import pytest
import torch

import llama.weights.writer as writer
from llama import CheckpointError, Llama
from llama.weights.writer import DiskFullError, reshard_checkpoint


def build(ckpt, tokenizer):
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=16, max_batch_size=1, device="cpu", dtype="float32")


def quiet(msg):
    pass


@pytest.fixture
def two(make_ckpt, tmp_path):
    """Two 2-shard checkpoints of the same shape, different weights (seeds)."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(make_ckpt("llama3", shards=2, seed=0), a)
    shutil.copytree(make_ckpt("llama3", shards=2, seed=1), b)
    return a, b


def test_a_shard_of_another_checkpoint_is_named(two, llama3_tokenizer_path):
    a, b = two
    shutil.copy(b / "consolidated.01.pth", a / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"mixes files of different checkpoints: consolidated.01.pth has other "
                                              r"contents than the writer wrote"):
        build(a, llama3_tokenizer_path)


def test_a_stray_shard_is_named(two, llama3_tokenizer_path):
    a, b = two
    shutil.copy(b / "consolidated.01.pth", a / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.02.pth is not one of the files written together"):
        build(a, llama3_tokenizer_path)


def test_without_manifest_shards_of_another_shape_are_named(two, make_ckpt, llama3_tokenizer_path):
    """Meta's folders have no manifest: shard shapes and dtypes must still agree."""
    a, _ = two
    (a / "manifest.json").unlink()
    other = make_ckpt("llama3", shards=2, dtype=torch.bfloat16)
    shutil.copy(other / "consolidated.01.pth", a / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated.01.pth does not match .*consolidated.00.pth \(first "
                                              r"difference: .*torch.bfloat16\) vs .*torch.float32\)\): the shards come from "
                                              r"different checkpoints"):
        build(a, llama3_tokenizer_path)


def test_interrupted_force_overwrite_never_loads_as_a_mix(two, tmp_path, monkeypatch, llama3_tokenizer_path):
    a, b = two
    out = tmp_path / "out"
    reshard_checkpoint(a, out, 2, progress=quiet)
    real_replace, calls = os.replace, []

    def killed_after_first_rename(src, dst):
        if str(dst).endswith(".pth"):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the kill, between the renames of the two new shards
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        reshard_checkpoint(b, out, 2, force=True, progress=quiet)
    monkeypatch.undo()
    # consolidated.00.pth is b's, consolidated.01.pth still a's: refused, with the fix.
    with pytest.raises(CheckpointError, match=r"a write into this folder was interrupted .*run the conversion or split "
                                              r"again \(with --force\)"):
        build(out, llama3_tokenizer_path)
    reshard_checkpoint(b, out, 2, force=True, progress=quiet)
    assert build(out, llama3_tokenizer_path) is not None
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("planted", ["params.json", "checklist.chk", "manifest.json", "params.json.tmp",
                                     "checklist.chk.tmp", "consolidated.00.pth", "consolidated.00.pth.tmp"])
def test_planted_symlinks_are_never_written_through(make_ckpt, tmp_path, planted):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / planted).symlink_to(victim)
    reshard_checkpoint(make_ckpt("llama3"), out, 1, force=True, progress=quiet)
    assert victim.read_text() == "precious"
    if not planted.endswith(".tmp"):
        assert not (out / planted).is_symlink()  # replaced by the new file, not written through


def _full_disk_after(n):
    """A write that fails with ENOSPC once `n` bytes have gone through."""
    real_write, written = writer._HashingWriter.write, [0]

    def write(self, data):
        written[0] += len(data)
        if written[0] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    return write


def test_full_disk_while_sharding_says_so_and_leaves_nothing(make_ckpt, tmp_path, monkeypatch, capsys):
    from utils.shard_model_checkpoint import main

    monkeypatch.setattr(writer._HashingWriter, "write", _full_disk_after(50_000))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"the disk holding .*out is full \([\d,]+ bytes free\) .*nothing was published"):
        reshard_checkpoint(make_ckpt("llama3"), out, 2, progress=quiet)
    assert list(out.iterdir()) == []
    assert main(["-n", "2", "-i", str(make_ckpt("llama3")), "-o", str(tmp_path / "cli")]) == 2
    assert "is full" in capsys.readouterr().err


def test_full_disk_during_an_overwrite_keeps_the_old_folder(make_ckpt, tmp_path, monkeypatch, llama3_tokenizer_path):
    out = tmp_path / "out"
    reshard_checkpoint(make_ckpt("llama3"), out, 2, progress=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(writer._HashingWriter, "write", _full_disk_after(50_000))
    with pytest.raises(DiskFullError):
        reshard_checkpoint(make_ckpt("llama3", seed=1), out, 2, force=True, progress=quiet)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert build(out, llama3_tokenizer_path) is not None


def test_full_disk_during_gguf_conversion(tiny_gguf, tmp_path, monkeypatch):
    from utils.convert_gguf_checkpoint import convert

    def no_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from OSError(
            errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.torch, "save", no_space)
    with pytest.raises(DiskFullError, match=r"is full"):
        convert(tiny_gguf[0], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_manifest_lists_every_shard_with_size(make_ckpt, tmp_path):
    out = reshard_checkpoint(make_ckpt("llama3"), tmp_path / "out", 2, progress=quiet)
    data = json.loads((out / "manifest.json").read_text())
    assert data["complete"] is True
    assert {n: f["size"] for n, f in data["files"].items()} == {
        n: (out / n).stat().st_size for n in ("consolidated.00.pth", "consolidated.01.pth")}
