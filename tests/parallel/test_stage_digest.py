"""Every node checks the whole model (issue 27): a stage-split checkpoint
records the whole original's digest in each stage's pipeline.json, and the
start-up comparison (llama/parallel/fingerprint.py) holds it against every
rank's, so a node whose stage comes from another checkpoint of the same shape
stops every node. Also: what a difference says (the field and both values).

In-process: `record` is what each rank sends, `compare` what every rank does
with what all sent; one two-node torchrun test goes through Llama.build."""

import json
import shutil
import subprocess

import pytest

from conftest import REPO
from engine_helpers import FOUR_LAYERS, stage_args
from llama.parallel.fingerprint import compare, record
from llama.weights.stages import NAME, model_digest, read_record, stage_folder


def _split(src, out, stages=2, shards=1):
    from llama.weights.writer import reshard_checkpoint

    return reshard_checkpoint(src, out, shards, pipeline_stages=stages, progress=lambda msg: None)


def _stage_records(folders, digests=True):
    """What the ranks of a one-node-per-stage run send: rank = stage."""
    return [record(folder, folder / "tokenizer.model", rank, stage=rank,
                   model=model_digest(folder) if digests else None, extra={"weights (replicated norms)": str(rank)},
                   pipeline_stages=len(folders), dtype="torch.float32")
            for rank, folder in enumerate(folders)]


def _drop_digest(folder):
    data = json.loads((folder / NAME).read_text())
    del data["model"]
    (folder / NAME).write_text(json.dumps(data))


def test_every_stage_records_the_whole_checkpoints_digest(make_ckpt, tmp_path):
    src = make_ckpt("llama3", shards=2, **FOUR_LAYERS)
    out = _split(src, tmp_path / "split", 3, shards=2)
    digests = {read_record(out / f"stage{s}")["model"] for s in range(3)}
    assert len(digests) == 1
    # a whole checkpoint with a manifest gives the same digest, read from its manifest
    assert model_digest(src) == digests.pop()
    other = _split(make_ckpt("llama3", shards=2, seed=1, **FOUR_LAYERS), tmp_path / "other", 3, shards=2)
    assert model_digest(other / "stage0") != model_digest(out / "stage0")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    (copy / "manifest.json").unlink()
    assert model_digest(copy) is None  # a whole checkpoint without manifest: nothing to say
    assert model_digest(tmp_path / "nowhere") is None  # never raises: the loader reports missing folders


def test_stages_from_different_checkpoints_of_one_shape_are_refused(make_ckpt, tmp_path):
    a = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "a")
    b = _split(make_ckpt("llama3", seed=1, **FOUR_LAYERS), tmp_path / "b")
    mixed = [a / "stage0", b / "stage1"]
    compare(_stage_records(mixed, digests=False))  # without the digest nothing told them apart (the bug)
    compare(_stage_records([a / "stage0", a / "stage1"]))  # one checkpoint: agree
    with pytest.raises(ValueError) as e:
        compare(_stage_records(mixed))
    msg = str(e.value)
    assert msg.startswith("the nodes do not load the same checkpoint: compared with rank 0 on node ")
    assert f"rank 1 on node " in msg and f"({b / 'stage1'}) differs in whole model (rank 0 vs rank 1: digest " in msg
    assert ": their stages were split from different checkpoints)" in msg
    assert model_digest(a / "stage0")[:8] in msg and model_digest(b / "stage1")[:8] in msg


def test_old_stage_folders_without_the_digest_still_load(make_ckpt, tmp_path):
    out = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "old")
    new = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "new")
    for stage in (0, 1):
        _drop_digest(out / f"stage{stage}")
        assert model_digest(out / f"stage{stage}") is None
        assert stage_folder(out, 2, stage, stage_args(out))[1] == [range(0, 3), range(3, 4)][stage]
    compare(_stage_records([out / "stage0", out / "stage1"]))  # no rank has one: not compared
    with pytest.raises(ValueError, match=r"differs in whole model \(rank 0 vs rank 1: digest [0-9a-f]{8} vs none; "
                                         r"rank 1 has none: a stage folder split by an older version, .*split the "
                                         r"checkpoint again with utils/shard_model_checkpoint.py"):
        compare(_stage_records([new / "stage0", out / "stage1"]))
    with pytest.raises(ValueError, match=r"digest none vs [0-9a-f]{8}; rank 0 has none"):
        compare(_stage_records([out / "stage0", new / "stage1"]))


def test_a_malformed_digest_is_refused(make_ckpt, tmp_path):
    folder = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "s") / "stage0"
    data = json.loads((folder / NAME).read_text())
    for bad in (7, "not hex", "ab" * 40):
        (folder / NAME).write_text(json.dumps({**data, "model": bad}))
        with pytest.raises(ValueError, match="pipeline.json is not a pipeline stage record this version writes; split"):
            read_record(folder)
        assert model_digest(folder) is None


def test_a_difference_names_the_field_and_both_values(make_ckpt, tmp_path):
    two, four = make_ckpt("llama3"), make_ckpt("llama3", **FOUR_LAYERS)
    rec = [record(ckpt, ckpt / "tokenizer.model", rank, max_seq_len=size)
           for rank, (ckpt, size) in enumerate(((four, 64), (two, 96)))]
    with pytest.raises(ValueError) as e:
        compare(rec)
    msg = str(e.value)
    assert "differs in max_seq_len (rank 0 vs rank 1: 64 vs 96)" in msg
    assert "params.json (rank 0 vs rank 1: n_layers 4 vs 2)" in msg
    assert "shard sizes (rank 0 vs rank 1: consolidated.00.pth " in msg and " bytes)" in msg
    assert "manifest.json (rank 0 vs rank 1: hash " in msg
    # the same values, written with other spacing: said so, not a list of no fields
    copy = tmp_path / "copy"
    shutil.copytree(two, copy)
    (copy / "params.json").write_text(json.dumps(json.loads((two / "params.json").read_text()), indent=8))
    with pytest.raises(ValueError, match=r"differs in params.json \(rank 0 vs rank 1: the same values, written "
                                         r"differently: copy one params.json to every node\)"):
        compare([record(two, two / "tokenizer.model", 0), record(copy, copy / "tokenizer.model", 1)])


def test_files_of_a_stage_are_compared_with_that_stages_first_rank(make_ckpt, tmp_path):
    """Two stages of two ranks: rank 3's shard differs from rank 2's, the first rank of stage 1."""
    out = _split(make_ckpt("llama3", shards=2, **FOUR_LAYERS), tmp_path / "s", 2, shards=2)
    node = tmp_path / "node"
    shutil.copytree(out / "stage1", node)
    (node / "consolidated.00.pth").write_bytes(b"short")
    folders = [out / "stage0", out / "stage0", out / "stage1", node]
    rec = [record(f, f / "tokenizer.model", rank, stage=rank // 2, model=model_digest(f))
           for rank, f in enumerate(folders)]
    with pytest.raises(ValueError, match=r"rank 3 on node .* differs in "
                                         r"shard sizes \(rank 2 vs rank 3: consolidated.00.pth [\d,]+ vs 5 bytes\)"):
        compare(rec)


@pytest.mark.slow
def test_two_nodes_with_stages_of_different_checkpoints_both_stop(make_ckpt, tmp_path):
    """Through Llama.build on two torchrun launches, one stage folder each."""
    from dist_helpers import free_port, worker_cmd

    a = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "a")
    b = _split(make_ckpt("llama3", seed=1, **FOUR_LAYERS), tmp_path / "b")
    port, procs = free_port(), []
    for node, folder in enumerate((a / "stage0", b / "stage1")):
        cmd = worker_cmd(folder, tmp_path / "x.pt", 1, node=node, port=port, pipeline_stages=2)
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    for out in outputs:
        assert "exitcode  : 2" in out, out
        assert "differs in whole model (rank 0 vs rank 1: digest" in out, out
        assert "their stages were split from different checkpoints" in out, out


# -- the split by cost ---------------------------------------------------------------------


def test_the_cost_split_gives_the_last_stage_fewer_layers():
    from llama.weights.args import ModelArgs
    from llama.weights.stages import stage_costs, stage_layers

    llama31_8b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                           ffn_dim_multiplier=1.3)
    assert stage_costs(llama31_8b) == (218103808, 525336576)  # a layer; the output, 2.4 layers' worth
    splits = {p: [stage_layers(llama31_8b, p, s) for s in range(p)] for p in (2, 3, 4, 32)}
    assert splits[2] == [range(0, 17), range(17, 32)]  # 17 layers vs 15 and the output
    assert splits[3] == [range(0, 11), range(11, 23), range(23, 32)]
    assert splits[32] == [range(s, s + 1) for s in range(32)]  # one layer each, however the cost falls
    assert [stage_layers(llama31_8b, 2, s, "even") for s in range(2)] == [range(0, 16), range(16, 32)]
    for parts in splits.values():  # every layer once, in order, at least one a stage
        assert [i for r in parts for i in r] == list(range(32)) and all(len(r) for r in parts)
    tiny_vocab = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=8, multiple_of=32)
    assert [stage_layers(tiny_vocab, 3, s) for s in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]
    huge_vocab = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    assert [stage_layers(huge_vocab, 3, s) for s in range(3)] == [range(0, 4), range(4, 5), range(5, 6)]
    with pytest.raises(ValueError, match="vocab_size -1 is not resolved"):
        stage_layers(ModelArgs(n_layers=4), 2, 0)
    with pytest.raises(ValueError, match="unknown stage split 'by hand'"):
        stage_layers(llama31_8b, 2, 0, "by hand")


def test_old_even_split_folders_load_and_a_mixed_split_is_named(make_ckpt, tmp_path):
    src = make_ckpt("llama3", **FOUR_LAYERS)
    new = _split(src, tmp_path / "new")
    old = _split(src, tmp_path / "old")
    args = stage_args(src)
    for stage, layers in enumerate((range(0, 2), range(2, 4))):  # what an older version wrote: the even split
        data = json.loads((old / f"stage{stage}" / NAME).read_text())
        del data["split"]
        (old / f"stage{stage}" / NAME).write_text(json.dumps({**data, "layers": [layers.start, layers.stop]}))
        assert stage_folder(old, 2, stage, args)[1:] == (layers, "even")
    assert stage_folder(new, 2, 1, args)[1:] == (range(3, 4), "cost")
    tampered = json.loads((new / "stage1" / NAME).read_text())
    (new / "stage1" / NAME).write_text(json.dumps({**tampered, "layers": [2, 4]}))  # "cost" with even layers
    with pytest.raises(ValueError, match=r"says stage 1 holds layers 2..3 of 4, not what params.json \(n_layers=4\) "
                                         "and its cost split give; split the checkpoint again"):
        stage_folder(new, 2, 1, args)
    records = _stage_records([new / "stage0", old / "stage1"])
    for r, split in zip(records, ("cost", "even")):
        r["about"]["stage_split"] = split  # as Llama.build sends it (llama/builder.py inspect_files)
    with pytest.raises(ValueError, match=r"differs in stage_split \(rank 0 vs rank 1: cost vs even: the stages' "
                                         r"layers do not join up; .*split the whole checkpoint again with "
                                         r"utils/shard_model_checkpoint.py --pipeline_stages N"):
        compare(records)
