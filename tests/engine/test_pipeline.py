"""Pipeline stages (llama/engine/runner.py): the layers split into stages give the
tokens of one process, from a whole checkpoint or a stage-split one; the
stage-split writer; and the errors."""

import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO
from engine_helpers import FOUR_LAYERS, _stage_model, stage_args


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_stages_chained_equal_the_whole_model(family, make_ckpt):
    ckpt = make_ckpt(family, **FOUR_LAYERS)
    whole, _ = _stage_model(ckpt, None)
    stages = [_stage_model(ckpt, layers)[0] for layers in (range(0, 1), range(1, 3), range(3, 4))]
    assert stages[0].output is None and stages[1].tok_embeddings is None and stages[2].tok_embeddings is None
    tokens = torch.tensor([[1, 5, 9, 200, 7], [3, 4, 5, 6, 8]])
    want = whole.forward(tokens, 0)
    h = tokens
    for stage in stages:
        h = stage.forward(h, 0)
    torch.testing.assert_close(h, want, atol=1e-5, rtol=1e-5)
    # packed prefill, then one decoding step, through the stages
    want = whole.prefill([[1, 5, 9], [3, 4]], rows=[0, 1])
    h = None
    for stage in stages:
        h = stage.prefill([[1, 5, 9], [3, 4]], rows=[0, 1], hidden=h)
    for got, ref in zip(h, want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_stage_loads_only_its_layers(make_ckpt):
    _, state = _stage_model(make_ckpt("llama3", **FOUR_LAYERS), range(1, 3))
    assert {k.split(".")[1] for k in state if k.startswith("layers.")} == {"1", "2"}
    assert "tok_embeddings.weight" not in state and "output.weight" not in state and "norm.weight" in state


# -- the stage-split writer -------------------------------------------------------


def _split(src, out, stages, shards=1):
    from llama.weights.writer import reshard_checkpoint

    return reshard_checkpoint(src, out, shards, pipeline_stages=stages, progress=lambda msg: None)


def test_stage_split_round_trip(make_ckpt, tmp_path):
    from llama.weights.checkpoint import find_shards, load_shard

    src = make_ckpt("llama3", shards=2, **FOUR_LAYERS)
    out = _split(src, tmp_path / "split", 3, shards=2)
    assert sorted(p.name for p in out.iterdir()) == ["stage0", "stage1", "stage2"]
    full = {k: v for p in find_shards(src) for k, v in load_shard(p).items()}
    # The cost split: the tiny model's output layer (vocabulary 128256 x dim 64) costs
    # more than all its layers, so the last stages get one layer each.
    for stage, layers in enumerate([[0, 1], [2], [3]]):
        folder = out / f"stage{stage}"
        record = json.loads((folder / "pipeline.json").read_text())
        assert record.pop("model") == json.loads((out / "stage0" / "pipeline.json").read_text())["model"]
        assert record == {"stage": stage, "stages": 3, "layers": [layers[0], layers[-1] + 1], "n_layers": 4,
                          "split": "cost", "shards": 2}
        assert {"params.json", "tokenizer.model", "checklist.chk", "manifest.json"} <= {p.name for p in folder.iterdir()}
        assert "pipeline.json" in (folder / "checklist.chk").read_text()
        for shard in find_shards(folder):
            state = load_shard(shard)
            held = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
            assert held == set(layers)  # global layer numbers kept
            assert ("tok_embeddings.weight" in state) == (stage == 0)
            assert ("output.weight" in state) == (stage == 2)
            for key, t in state.items():  # the same tensors as the 2-shard input, when the split is the same
                if key.startswith("layers."):
                    assert t.shape == full[key].shape
        assert not list(folder.glob(".*.tmp"))


def test_a_stage_folder_loads_as_the_whole_checkpoint_does(make_ckpt, tmp_path):
    src = make_ckpt("llama2", **FOUR_LAYERS)
    out = _split(src, tmp_path / "split", 2)
    for layers in (range(0, 2), range(2, 4)):
        _, from_whole = _stage_model(src, layers)
        # only this stage's folder, copied alone (a node holding only its own stage)
        node = tmp_path / f"node{layers.start}"
        shutil.copytree(out / f"stage{layers.start // 2}", node / f"stage{layers.start // 2}")
        from llama.weights.stages import stage_folder

        folder, held, split = stage_folder(node, 2, layers.start // 2, stage_args(src))
        assert held == layers and split == "cost"  # llama2's tiny vocabulary: the cost split is even
        _, from_split = _stage_model(folder, layers)
        assert from_whole.keys() == from_split.keys()
        for k in from_whole:
            assert torch.equal(from_whole[k], from_split[k])


# -- errors -----------------------------------------------------------------------


def test_errors_name_the_numbers_and_the_fix(make_ckpt, tmp_path):
    from llama.parallel.distributed import check_pipeline_stages
    from llama.weights.args import ModelArgs
    from llama.weights.stages import stage_folder, stage_layers

    with pytest.raises(ValueError, match="the model has 2 layers, too few for 3 pipeline stages .* at most 2 stages"):
        stage_layers(ModelArgs(n_layers=2), 3, 0)
    with pytest.raises(ValueError, match="pipeline_stages=2 does not divide the 3 processes launched"):
        check_pipeline_stages(2, 3)
    with pytest.raises(ValueError, match="pipeline_stages must be a positive integer, got 0"):
        check_pipeline_stages(0, 2)
    out = _split(make_ckpt("llama3", **FOUR_LAYERS), tmp_path / "split", 2)
    args = stage_args(out)
    fix = "run it with --pipeline_stages 2 .*or split the whole checkpoint again .*--pipeline_stages 4"
    with pytest.raises(ValueError, match=f"holds a checkpoint split into 2 pipeline stages, but this run has 4 .*{fix}"):
        stage_folder(out, 4, 0, args)
    with pytest.raises(ValueError, match="split into 2 pipeline stages, but this run has 1"):
        stage_folder(out / "stage1", 1, 0, args)  # one stage's folder run without stages
    with pytest.raises(ValueError, match="holds pipeline stage 1, but rank 0 .* needs stage 0: give each node"):
        stage_folder(out / "stage1", 2, 0, args)
    shutil.rmtree(out / "stage0")
    with pytest.raises(ValueError, match="lacks stage0/, which rank 0 .* needs .*holds stage1.*copy stage0/"):
        stage_folder(out, 2, 0, args)
    with pytest.raises(ValueError, match="too few for 3 pipeline stages"):
        _split(make_ckpt("llama3"), tmp_path / "x", 3)  # TINY has 2 layers
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_build_refuses_stages_that_do_not_divide_the_processes(make_ckpt):
    from llama import Llama

    ckpt = make_ckpt("llama3")
    with pytest.raises(ValueError, match="pipeline_stages=2 does not divide the 1 processes launched"):
        Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 32, 1, device="cpu", dtype="float32",
                    pipeline_stages=2)


def test_shard_cli_writes_stage_folders(make_ckpt, tmp_path):
    import sys

    r = subprocess.run([sys.executable, "-m", "utils.shard_model_checkpoint", "--pipeline_stages", "2", "-n", "1",
                        "-i", str(make_ckpt("llama3")), "-o", str(tmp_path / "o")], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "stage1" / "pipeline.json").is_file()
    r = subprocess.run([sys.executable, "-m", "utils.shard_model_checkpoint", "--pipeline_stages", "3", "-n", "1",
                        "-i", str(make_ckpt("llama3")), "-o", str(tmp_path / "p")], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "error: the model has 2 layers, too few for 3 pipeline stages" in r.stderr


# -- torchrun: pipeline mode gives one process's tokens ----------------------------


@pytest.mark.slow
def test_two_stages_on_two_nodes_each_with_only_its_own_folder(make_ckpt, tmp_path):
    """Llama 3, 2 stages, two torchrun launches ("nodes") whose --ckpt_dir
    folders hold only their own stage: neither can open the other's files.
    Greedy, sampled (seeded, temperature 1.0) and rank-0-only requests all
    give one process's tokens."""
    from dist_helpers import free_port, run_worker, worker_cmd

    src = make_ckpt("llama3", **FOUR_LAYERS)
    reference = run_worker(src, tmp_path)
    split = _split(src, tmp_path / "split", 2)
    port, out = free_port(), tmp_path / "two.pt"
    procs = []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        shutil.copytree(split / f"stage{node}", folder / f"stage{node}")
        tokenizer = folder / f"stage{node}" / "tokenizer.model"
        cmd = worker_cmd(folder, out, 1, node=node, port=port, pipeline_stages=2)
        cmd[cmd.index("--tokenizer_path") + 1] = str(tokenizer)
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    result = torch.load(out, weights_only=True)
    assert result["world_size"] == 2
    for key in ("tokens", "joined", "followed"):
        assert result[key] == reference[key], key
    torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stages, nproc, shards", [(3, 3, None), (2, 4, 2)], ids=["3_stages", "2_stages_x_tp2"])
def test_stages_equal_one_process_llama2(stages, nproc, shards, make_ckpt, tmp_path):
    """Llama 2 (SentencePiece, embedding split by dim): 3 stages from the whole
    checkpoint, and 2 stages of 2 tensor-parallel ranks each from a stage-split
    checkpoint of 2 shards per stage."""
    from dist_helpers import one_process_result, run_worker

    src = make_ckpt("llama2", **FOUR_LAYERS)
    reference = one_process_result(src, tmp_path)  # one run for both cases
    ckpt = src if shards is None else _split(src, tmp_path / "split", stages, shards)
    if shards is not None:
        shutil.copy(src / "tokenizer.model", ckpt / "tokenizer.model")  # run_worker passes ckpt/tokenizer.model
    result = run_worker(ckpt, tmp_path, nproc=nproc, pipeline_stages=stages)
    assert result["world_size"] == nproc
    for key in ("tokens", "joined", "followed"):
        assert result[key] == reference[key], key
    torch.testing.assert_close(result["logits"], reference["logits"], atol=1e-4, rtol=1e-4)


def test_pipeline_stages_flag_reaches_build(make_ckpt, tmp_path):
    """`llama complete --pipeline_stages 2` in one process: build's own error, from the flag."""
    import sys

    ckpt = make_ckpt("llama3")
    r = subprocess.run([sys.executable, "-m", "llama", "complete", "--ckpt_dir", str(ckpt), "--device", "cpu",
                        "--dtype", "float32", "--pipeline_stages", "2", "--max_gen_len", "2", "--prompt", "Hi"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pipeline_stages=2 does not divide the 1 processes launched" in r.stderr


@pytest.mark.slow
def test_nodes_given_different_numbers_of_stages_say_so(make_ckpt, tmp_path):
    from dist_helpers import free_port, worker_cmd

    ckpt, port = make_ckpt("llama3", **FOUR_LAYERS), free_port()
    procs = [subprocess.Popen(worker_cmd(ckpt, tmp_path / "x.pt", 1, node=n, port=port, pipeline_stages=stages),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, stages in ((0, 2), (1, 1))]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), "\n".join(outputs)
    for out in outputs:
        assert ("the ranks were given different numbers of pipeline stages: rank 0 has 2, rank 1 has 1; "
                "pass the same --pipeline_stages on every node") in out, out
