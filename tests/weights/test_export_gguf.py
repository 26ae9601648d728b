"""utils/export_gguf.py: a Meta checkpoint written as an F32 GGUF converts back
(utils/convert_gguf_checkpoint.py) to the same tensors, params and tokenizer
files, holds the tensors in llama.cpp's layout, and bad inputs are refused."""

import numpy as np
import pytest
import torch

from gguf_reference import write_tiny_gguf
from llama.weights.args import ModelArgs
from llama.cli.checkpoints import convert_gguf as convert
from llama.weights.gguf_export import ExportError, export_gguf
from utils.make_random_checkpoint import make_random_checkpoint, random_params


def load(ckpt):
    return torch.load(ckpt / "consolidated.00.pth", weights_only=True)


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].float(), b[name].float()), name


def gguf_tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def test_round_trip_of_a_converted_gguf(tiny_gguf, tmp_path):
    """GGUF -> checkpoint -> GGUF -> checkpoint: tensors, params.json and the
    tokenizer files come back identical; tied embeddings stay one tensor."""
    original, ckpt = tiny_gguf
    out = export_gguf(ckpt, tmp_path / "tiny-f32.gguf", tokenizer_from=original)
    back = convert(out, tmp_path / "back")
    assert_same_tensors(load(ckpt), load(back))
    for name in ("params.json", "tokenizer.model", "tokenizer.model.json"):
        assert (back / name).read_bytes() == (ckpt / name).read_bytes(), name
    reader, tensors = gguf_tensors(out)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd for the output
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    # The same rows as the GGUF the checkpoint came from (llama.cpp's layout: no permutation).
    _, first = gguf_tensors(original)
    assert sorted(first) == sorted(tensors)
    for name in first:
        np.testing.assert_array_equal(first[name], tensors[name], err_msg=name)
    assert reader.fields["general.file_type"].contents() == 0  # all F32
    assert reader.fields["llama.context_length"].contents() == 256  # the template's
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_round_trip_of_an_untied_bf16_llama31_checkpoint(tiny_gguf, tmp_path):
    """A random checkpoint in bf16 with its own output matrix, an FFN
    multiplier and Llama 3.1's scaled RoPE: its values come back in float32
    exactly, its shape and RoPE settings too."""
    template, _ = tiny_gguf
    params = random_params("llama3.1", dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=275,
                           multiple_of=32, ffn_dim_multiplier=1.3)
    ckpt = make_random_checkpoint(tmp_path / "ckpt", params, dtype=torch.bfloat16, seed=3)
    out = export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_from=template, context_length=1024)
    back = convert(out, tmp_path / "back")
    assert_same_tensors(load(ckpt), load(back))
    assert load(back)["output.weight"].dtype == torch.float32
    a = ModelArgs.from_params(params)
    b = ModelArgs.from_json(back / "params.json")
    assert (b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.ffn_hidden_dim, b.vocab_size) == (
        a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, 275)
    assert b.use_scaled_rope and b.rope_theta == 500000.0 and b.norm_eps == 1e-5
    reader, tensors = gguf_tensors(out)
    assert "rope_freqs.weight" in tensors and "output.weight" in tensors
    assert reader.fields["llama.context_length"].contents() == 1024


def test_untied_gguf_keeps_its_output_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "u.gguf", tied=False)
    ckpt = convert(tmp_path / "u.gguf", tmp_path / "ckpt")
    out = export_gguf(ckpt, tmp_path / "again.gguf", tokenizer_from=tmp_path / "u.gguf")
    _, first = gguf_tensors(tmp_path / "u.gguf")
    _, again = gguf_tensors(out)
    np.testing.assert_array_equal(first["output.weight"], again["output.weight"])


def test_vocabulary_mismatch_is_refused(tiny_gguf, make_ckpt, tmp_path):
    template, _ = tiny_gguf
    ckpt = make_ckpt("llama3")  # 128,256 tokens; the template has 275
    with pytest.raises(ExportError, match=r"has 275 tokens but the checkpoint's embeddings have 128256 rows"):
        export_gguf(ckpt, tmp_path / "x.gguf", tokenizer_from=template)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_sharded_checkpoint_and_missing_template_are_refused(tiny_gguf, make_ckpt, tmp_path):
    template, ckpt = tiny_gguf
    with pytest.raises(ExportError, match=r"has 2 shards; merge them first: python utils/shard_model_checkpoint.py -n 1"):
        export_gguf(make_ckpt("llama3", shards=2), tmp_path / "x.gguf", tokenizer_from=template)
    with pytest.raises(FileNotFoundError, match=r"nope.gguf not found \(--tokenizer_from\)"):
        export_gguf(ckpt, tmp_path / "x.gguf", tokenizer_from=tmp_path / "nope.gguf")
    no_tokenizer = tmp_path / "weights_only.gguf"
    write_tiny_gguf(no_tokenizer, omit=("tokenizer.ggml.tokens",))
    with pytest.raises(ExportError, match=r"holds no tokenizer \(no tokenizer.ggml.tokens\)"):
        export_gguf(ckpt, tmp_path / "x.gguf", tokenizer_from=no_tokenizer)


def test_command_line(tiny_gguf, tmp_path, capsys):
    from utils.export_gguf import main

    template, ckpt = tiny_gguf
    main(["--ckpt_dir", str(ckpt), "--tokenizer_from", str(template), "--out", str(tmp_path / "c.gguf")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "c.gguf").is_file()
    with pytest.raises(SystemExit) as e:
        main(["--ckpt_dir", str(tmp_path / "none"), "--tokenizer_from", str(template), "--out", str(tmp_path / "d.gguf")])
    assert e.value.code == 2
    assert "params.json not found" in capsys.readouterr().err
