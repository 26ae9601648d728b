"""What the commands that write checkpoints do to their outputs (issue 26):
an output is never an input, however it is reached (a bind mount, a
symbolic link, a hard link, a folder above or below it); files get the
permissions the umask asks for; tied embeddings are counted and stored once."""

import contextlib
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from llama.cli.checkpoints import convert_gguf
from llama.cli.info import checkpoint_info
from llama.weights import writer
from llama.weights.checkpoint import find_shards, load_shard
from llama.weights.gguf_export import ExportError, export_gguf
from llama.weights.writer import check_output_dir, reshard_checkpoint, write_checkpoint
from utils.shard_model_checkpoint import main as shard_main


def quiet(msg):
    pass


def digests(folder):
    """name -> md5 of every file in `folder`: what must not change."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def ckpt(make_ckpt, tmp_path):
    """A private copy of a tiny Llama 3 checkpoint (a test that failed would overwrite only this)."""
    src = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("llama3"), src)
    return src


@contextlib.contextmanager
def bind_mount(source, target):
    """`target` as a bind mount of `source`, unmounted afterwards; skips where mounting is not allowed."""
    target.mkdir()
    r = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here ({r.stderr.strip()[:80]})")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def shard_error(capsys, argv):
    assert shard_main(argv) == 2
    return capsys.readouterr().err


def test_force_through_a_bind_mount_of_the_input_is_refused(ckpt, tmp_path, capsys):
    before = digests(ckpt)
    with bind_mount(ckpt, tmp_path / "mnt") as mnt:
        err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(mnt), "--force"])
        assert f"output directory {mnt} is the input directory {ckpt}" in err
        assert "choose another output" in err
        # The other way round: the input named through the mount, the output by its real path.
        err = shard_error(capsys, ["-n", "2", "-i", str(mnt), "-o", str(ckpt), "--force"])
        assert "is the input directory" in err
        # A folder inside the mounted input is inside the input.
        err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(mnt / "split"), "--force"])
        assert f"output directory {mnt / 'split'} is inside the input directory {ckpt}" in err
    assert digests(ckpt) == before and not (ckpt / "split").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "mnt"]  # no temporary file left anywhere


def test_bind_mount_of_a_folder_holding_the_input_is_refused(ckpt, tmp_path, capsys):
    before = digests(ckpt)
    with bind_mount(tmp_path, tmp_path.parent / f"{tmp_path.name}-mnt") as mnt:
        err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(mnt / "ckpt"), "--force"])
        assert "is the input directory" in err
        err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(mnt), "--force"])
        assert f"output directory {mnt} contains the input directory {ckpt}" in err
        assert "choose an output outside it" in err
    assert digests(ckpt) == before


def test_symlinked_outputs_are_refused(ckpt, tmp_path, capsys):
    before = digests(ckpt)
    (tmp_path / "link").symlink_to(ckpt)
    err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(tmp_path / "link"), "--force"])
    assert f"output directory {tmp_path / 'link'} is the input directory" in err
    # A link to the folder above the input, with and without a path below it.
    (tmp_path / "up").symlink_to(tmp_path)
    err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(tmp_path / "up" / "ckpt"), "--force"])
    assert "is the input directory" in err
    err = shard_error(capsys, ["-n", "2", "-i", str(ckpt), "-o", str(tmp_path / "up"), "--force"])
    assert "contains the input directory" in err
    assert digests(ckpt) == before


def test_an_input_inside_the_output_is_refused(ckpt, tmp_path, capsys):
    """The input is a folder inside the output (as a stage folder would be):
    writing stage folders or stale-shard removal there could destroy it."""
    out = tmp_path / "out"
    out.mkdir()
    inner = out / "stage0"
    shutil.move(ckpt, inner)
    before = digests(inner)
    err = shard_error(capsys, ["-n", "1", "-i", str(inner), "-o", str(out), "--force", "--pipeline_stages", "2"])
    assert f"output directory {out} contains the input directory {inner}" in err
    assert digests(inner) == before and sorted(p.name for p in out.iterdir()) == ["stage0"]


def test_a_distinct_output_is_still_written(ckpt, tmp_path):
    """The identity checks refuse only what they should: a sibling folder is fine, --force too."""
    out = reshard_checkpoint(ckpt, tmp_path / "two", 2, progress=quiet)
    assert len(find_shards(out)) == 2
    assert reshard_checkpoint(ckpt, tmp_path / "two", 2, progress=quiet, force=True) == out
    with pytest.raises(ValueError, match="is not empty; choose an empty one or pass --force"):
        check_output_dir(out, force=False, protect=[ckpt])
    check_output_dir(tmp_path / "new" / "deep", force=False, protect=[ckpt])  # not there yet: fine


def test_convert_and_export_refuse_their_own_inputs(tiny_gguf, tmp_path):
    gguf_path, converted = tiny_gguf
    template = tmp_path / "template.gguf"
    shutil.copy(gguf_path, template)
    before = hashlib.md5(template.read_bytes()).hexdigest()
    # llama convert: the output folder cannot be the GGUF file.
    with pytest.raises(ValueError, match=r"output directory .*template.gguf is the input file .*template.gguf"):
        convert_gguf(template, template, force=True)
    # export_gguf: a hard link, a symbolic link and the path itself of the template, and a shard.
    os.link(template, tmp_path / "hard.gguf")
    (tmp_path / "soft.gguf").symlink_to(template)
    for out in (template, tmp_path / "hard.gguf", tmp_path / "soft.gguf"):
        with pytest.raises(ExportError, match=rf"output {out} is the input file {template} \(the same file on disk\)"):
            export_gguf(converted, out, tokenizer_from=template)
    with pytest.raises(ExportError, match=r"is the input file .*consolidated.00.pth"):
        export_gguf(converted, converted / "consolidated.00.pth", tokenizer_from=template)
    with pytest.raises(ExportError, match=r"output .* is a directory; give the path of the file to write"):
        export_gguf(converted, tmp_path, tokenizer_from=template)
    assert hashlib.md5(template.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.gguf", "soft.gguf", "template.gguf"]


@contextlib.contextmanager
def umask(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_follow_the_umask(mask, mode, ckpt, tiny_gguf, tmp_path):
    with umask(mask):
        split = reshard_checkpoint(ckpt, tmp_path / "split", 2, progress=quiet)
        converted = convert_gguf(tiny_gguf[0], tmp_path / "converted")
        exported = export_gguf(tiny_gguf[1], tmp_path / "x.gguf", tokenizer_from=tiny_gguf[0])
    files = [*split.iterdir(), *converted.iterdir(), exported]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


def test_umask_read_without_proc(monkeypatch):
    """Where /proc cannot be read, the umask is set and put back once; it stays what it was."""
    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(writer, "open", no_proc, raising=False)
    monkeypatch.setattr(writer, "_UMASK", None)
    with umask(0o027):
        assert writer.new_file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # unchanged


@pytest.fixture
def tied_ckpt(make_ckpt, tmp_path):
    """A tiny Llama 3 checkpoint whose output.weight is its tok_embeddings.weight
    (as SmolLM2's), splittable into 2 and 4 shards."""
    src = make_ckpt("llama3")
    state = dict(load_shard(find_shards(src)[0]))
    state["output.weight"] = state["tok_embeddings.weight"]
    return write_checkpoint(tmp_path / "tied", json_params(src), [state], tokenizer_path=src / "tokenizer.model")


def json_params(ckpt):
    import json

    return json.loads((ckpt / "params.json").read_text())


def test_info_counts_tied_embeddings_once(tied_ckpt, make_ckpt, tmp_path):
    untied = checkpoint_info(make_ckpt("llama3"))
    tied = checkpoint_info(tied_ckpt)
    table = 128256 * 64
    assert not untied.tied_embeddings and tied.tied_embeddings
    assert tied.parameters == untied.parameters - table
    assert "; output tied to the embeddings)" in tied.report()
    assert "tied" not in untied.report()
    # A file that stores the same values twice (written by an older tool) is tied too.
    twice = tmp_path / "twice"
    shutil.copytree(tied_ckpt, twice)
    state = dict(load_shard(twice / "consolidated.00.pth"))
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, twice / "new.pth")  # not over the memory-mapped file it was read from
    os.replace(twice / "new.pth", twice / "consolidated.00.pth")
    (twice / "manifest.json").unlink()  # the file changed on purpose
    assert checkpoint_info(twice).parameters == tied.parameters


def test_converted_tied_model_is_counted_once(tiny_gguf):
    """A converted GGUF with tied embeddings (SmolLM2's layout: one tensor under both names)."""
    info = checkpoint_info(tiny_gguf[1])
    shapes = {k: v.shape for k, v in load_shard(tiny_gguf[1] / "consolidated.00.pth").items()}
    assert info.tied_embeddings
    assert info.parameters == sum(s.numel() for k, s in shapes.items() if k != "output.weight")


def assert_same_tensors(a_dir, b_dir):
    a, b = load_shard(find_shards(a_dir)[0]), load_shard(find_shards(b_dir)[0])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("n", [2, 4])
def test_split_then_merge_keeps_tied_weights_once(n, tied_ckpt, tmp_path):
    split = reshard_checkpoint(tied_ckpt, tmp_path / "split", n, progress=quiet)
    for path in find_shards(split):  # each shard holds its rows of the one table once
        state = load_shard(path)
        assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()
    merged = reshard_checkpoint(split, tmp_path / "merged", 1, progress=quiet)
    size = lambda ckpt: (ckpt / "consolidated.00.pth").stat().st_size  # noqa: E731
    assert abs(size(merged) - size(tied_ckpt)) < 4096, (size(merged), size(tied_ckpt))
    # Each shard adds its own headers and the replicated norms, never a second table (+32 MB).
    assert sum(p.stat().st_size for p in find_shards(split)) < size(tied_ckpt) + n * 32768
    assert_same_tensors(tied_ckpt, merged)
    state = load_shard(merged / "consolidated.00.pth")
    assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()


def test_a_checkpoint_holding_tied_weights_twice_is_merged_to_one_copy(tied_ckpt, tmp_path):
    state = dict(load_shard(tied_ckpt / "consolidated.00.pth"))
    state["output.weight"] = state["tok_embeddings.weight"].clone()
    twice = write_checkpoint(tmp_path / "twice", json_params(tied_ckpt), [state],
                             tokenizer_path=tied_ckpt / "tokenizer.model")
    # The writer itself stores equal tables once.
    assert abs((twice / "consolidated.00.pth").stat().st_size - (tied_ckpt / "consolidated.00.pth").stat().st_size) < 4096
    assert_same_tensors(tied_ckpt, twice)


def test_untied_weights_stay_apart(make_ckpt, tmp_path):
    src = make_ckpt("llama3")
    merged = reshard_checkpoint(reshard_checkpoint(src, tmp_path / "s", 2, progress=quiet), tmp_path / "m", 1,
                                progress=quiet)
    state = load_shard(merged / "consolidated.00.pth")
    assert not torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["output.weight"].data_ptr() != state["tok_embeddings.weight"].data_ptr()
    assert_same_tensors(src, merged)
