"""llama/weights/schema.py is the one description of the weights: the model, the
files the writer produces and the loader's checks all agree with it."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY
from llama.weights.args import ModelArgs
from llama.weights.checkpoint import find_shards, load_shard
from llama.parallel.distributed import init_distributed
from llama.model import FUSED, Transformer
from llama.weights.schema import model_weights, shard_shapes
from utils.make_random_checkpoint import make_random_checkpoint, random_params


@pytest.mark.parametrize("family, layout", [("llama2", "dim"), ("llama3", "vocab")])
def test_written_shards_have_the_schema_shapes(family, layout, tmp_path, sp_tokenizer_path):
    params = random_params(family, vocab_size=512, **TINY)  # llama2: vocab -1, the 512-token tokenizer's
    args = ModelArgs.from_params({**params, "vocab_size": 512})
    out = make_random_checkpoint(tmp_path / family, params, sp_tokenizer_path if family == "llama2" else None,
                                 n_shards=4, dtype=torch.float32)
    expected = shard_shapes(args, 4, layout)
    for path in find_shards(out):
        shard = load_shard(path)
        assert {k: tuple(v.shape) for k, v in shard.items()} == expected
    assert set(model_weights(args)) == set(expected)


def test_model_parameters_follow_the_schema():
    init_distributed("cpu")
    args = ModelArgs.from_params({**random_params("llama3", vocab_size=256, **TINY)}, max_seq_len=16, max_batch_size=1)
    with torch.device("meta"):
        model = Transformer(args)
    shapes = shard_shapes(args, 1, "vocab")
    expected = {}
    for name, shape in shapes.items():
        for fused, parts in FUSED.items():
            for part in parts:
                if name.endswith(f".{part}.weight"):
                    fused_name = name.replace(part, fused)
                    rows = expected.get(fused_name, (0, shape[1]))[0]
                    expected[fused_name] = (rows + shape[0], shape[1])
                    break
            else:
                continue
            break
        else:
            expected[name] = shape
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_loaders_do_not_import_the_model():
    code = "import sys, llama.weights.checkpoint, llama.weights.writer; print('llama.model' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
