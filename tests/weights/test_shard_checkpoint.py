"""utils/shard_model_checkpoint.py: split and merge Meta checkpoints."""

import hashlib
import json
import re
import shutil

import pytest
import torch

from llama import Llama
from llama.weights.checkpoint import find_shards, load_shard
from llama.weights.writer import reshard_checkpoint
from utils.shard_model_checkpoint import main as shard_main


def tensors(ckpt):
    return [load_shard(p) for p in find_shards(ckpt)]


def assert_bit_exact(a_dir, b_dir):
    a, b = tensors(a_dir), tensors(b_dir)
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def quiet(msg):
    pass


@pytest.mark.parametrize("family, n", [("llama2", 2), ("llama3", 2), ("llama3", 4)])
def test_split_then_merge_is_bit_exact(family, n, make_ckpt, tmp_path):
    src = make_ckpt(family, dtype=torch.bfloat16)
    reshard_checkpoint(src, tmp_path / "split", n, progress=quiet)
    reshard_checkpoint(tmp_path / "split", tmp_path / "merged", 1, progress=quiet)
    assert_bit_exact(src, tmp_path / "merged")
    assert json.loads((tmp_path / "split" / "params.json").read_text()) == json.loads((src / "params.json").read_text())


def test_split_layout_is_meta_layout(make_ckpt, tmp_path):
    """Llama 2 splits the embedding by dim (ParallelEmbedding), Llama 3 by vocab;
    with more shards than KV heads each shard holds one (replicated) KV head."""
    l2 = tensors(reshard_checkpoint(make_ckpt("llama2"), tmp_path / "l2", 2, progress=quiet))[0]
    l3 = tensors(reshard_checkpoint(make_ckpt("llama3"), tmp_path / "l3", 4, progress=quiet))
    assert l2["tok_embeddings.weight"].shape == (512, 32)
    assert l3[0]["tok_embeddings.weight"].shape == (128256 // 4, 64)
    assert l3[0]["layers.0.attention.wq.weight"].shape == (16, 64)  # one of 4 query heads
    assert l3[0]["layers.0.attention.wo.weight"].shape == (64, 16)
    wk = [s["layers.0.attention.wk.weight"] for s in l3]
    assert all(w.shape == (16, 64) for w in wk)  # one KV head each
    assert torch.equal(wk[0], wk[1]) and torch.equal(wk[2], wk[3]) and not torch.equal(wk[0], wk[2])


def test_resharding_paths_agree(make_ckpt, tmp_path):
    """4 -> 2 gives exactly what 1 -> 2 gives (undoing the KV replication of the 4-shard files)."""
    src = make_ckpt("llama3")
    reshard_checkpoint(src, tmp_path / "four", 4, progress=quiet)
    reshard_checkpoint(tmp_path / "four", tmp_path / "two_from_four", 2, progress=quiet)
    reshard_checkpoint(src, tmp_path / "two", 2, progress=quiet)
    assert_bit_exact(tmp_path / "two", tmp_path / "two_from_four")


def test_split_output_loads_and_matches(make_ckpt, tmp_path):
    src = make_ckpt("llama3")
    out = reshard_checkpoint(src, tmp_path / "split", 2, progress=quiet)
    kw = dict(max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    a = Llama.build(str(src), str(src / "tokenizer.model"), **kw)
    b = Llama.build(str(out), str(out / "tokenizer.model"), **kw)
    tokens = torch.randint(0, 128000, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.model.forward(tokens, 0), b.model.forward(tokens, 0))


def test_checklist_and_tokenizer(make_ckpt, sp_tokenizer_path, tmp_path):
    out = tmp_path / "out"
    assert shard_main(["-n", "2", "-i", str(make_ckpt("llama2")), "-o", str(out), "--tokenizer", str(sp_tokenizer_path)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "manifest.json", "params.json",
                     "tokenizer.model"]
    lines = (out / "checklist.chk").read_text().splitlines()
    assert len(lines) == 4
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == digest


def test_progress_is_printed_per_file(make_ckpt, tmp_path, capsys):
    assert shard_main(["-n", "2", "-i", str(make_ckpt("llama3")), "-o", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "consolidated.00.pth" in out and "consolidated.01.pth" in out and "done:" in out
    # Progress on stderr (not a terminal here: whole lines), ending with the totals.
    last = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(rf"writing {re.escape(str(tmp_path / 'o'))}: 2/2 shards, [\d.,]+ MB, [\d.,]+ MB/s, [\d.]+ s", last)


def shard_error(capsys, argv):
    assert shard_main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(make_ckpt, tmp_path, capsys):
    src = make_ckpt("llama3")
    err = shard_error(capsys, ["-n", "3", "-i", str(src), "-o", str(tmp_path / "o3")])
    assert "cannot be split into 3 parts; sizes that work: [1, 2, 4]" in err
    err = shard_error(capsys, ["-n", "2", "-i", str(src), "-o", str(src)])
    assert "is the input directory" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    err = shard_error(capsys, ["-n", "2", "-i", str(src), "-o", str(tmp_path / "full")])
    assert "is not empty; choose an empty one or pass --force" in err
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    err = shard_error(capsys, ["-n", "2", "-i", str(tmp_path / "nothing"), "-o", str(tmp_path / "o")])
    assert "input checkpoint directory" in err and "not found" in err
    err = shard_error(capsys, ["-n", "0", "-i", str(src), "-o", str(tmp_path / "o")])
    assert "must be a positive integer" in err


def test_missing_shard_and_mismatched_params(make_ckpt, tmp_path, capsys):
    four = tmp_path / "four"
    shutil.copytree(make_ckpt("llama3", shards=4), four)
    (four / "consolidated.02.pth").unlink()
    err = shard_error(capsys, ["-n", "1", "-i", str(four), "-o", str(tmp_path / "o")])
    assert "has shards [0, 1, 3] but not [2]: a shard is missing" in err
    one = tmp_path / "one"
    shutil.copytree(make_ckpt("llama3"), one)
    params = json.loads((one / "params.json").read_text())
    (one / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    err = shard_error(capsys, ["-n", "2", "-i", str(one), "-o", str(tmp_path / "o")])
    assert "params.json says n_layers=3 but" in err and "holds 2 layers" in err and "params.json does not belong" in err


def test_force_replaces_an_old_split(make_ckpt, tmp_path):
    src = make_ckpt("llama3")
    reshard_checkpoint(src, tmp_path / "o", 4, progress=quiet)
    reshard_checkpoint(src, tmp_path / "o", 2, force=True, progress=quiet)
    assert [p.name for p in find_shards(tmp_path / "o")] == ["consolidated.00.pth", "consolidated.01.pth"]


def test_failure_leaves_nothing_that_looks_complete(make_ckpt, tmp_path, monkeypatch):
    import llama.weights.writer as writer

    calls = []
    real_save = torch.save

    def failing_save(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(obj, f)

    monkeypatch.setattr(writer.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        reshard_checkpoint(make_ckpt("llama3"), tmp_path / "o", 2, progress=quiet)
    assert list((tmp_path / "o").iterdir()) == []
