"""params.json parsing and validation."""

import json

import pytest

from llama import ModelArgs

LLAMA2_7B = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA2_70B = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
              "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
             "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}
LLAMA31_8B = {**LLAMA3_8B, "use_scaled_rope": True}


@pytest.mark.parametrize("params, hidden", [
    (LLAMA2_7B, 11008),
    ({**LLAMA2_7B, "dim": 5120, "n_heads": 40, "n_layers": 40}, 13824),  # 13B
    (LLAMA2_70B, 28672),
    (LLAMA3_8B, 14336),
    (LLAMA31_8B, 14336),
])
def test_real_params_files(params, hidden):
    args = ModelArgs.from_params(params, max_seq_len=128, max_batch_size=2)
    assert args.ffn_hidden_dim == hidden
    assert args.n_kv_heads == params.get("n_kv_heads", params["n_heads"])
    assert args.rope_theta == params.get("rope_theta", 10000.0)
    assert args.use_scaled_rope == params.get("use_scaled_rope", False)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match=r"params.json has keys this model does not know: \['rope_scaling'\]"):
        ModelArgs.from_params({**LLAMA3_8B, "rope_scaling": 8})


def test_runtime_limits_do_not_belong_in_params():
    with pytest.raises(ValueError, match="does not know: \\['max_seq_len'\\]"):
        ModelArgs.from_params({**LLAMA3_8B, "max_seq_len": 8192})


@pytest.mark.parametrize("change, message", [
    ({"n_heads": 30}, "n_heads=30 does not divide dim=4096"),
    ({"n_kv_heads": 5}, "n_heads=32 is not a multiple of n_kv_heads=5"),
    ({"dim": 4128, "n_heads": 32 * 3}, "must be even"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"dim": 4096.0}, "dim must be a positive integer"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer or -1"),
    ({"ffn_dim_multiplier": -1.0}, r"ffn_dim_multiplier must be in \(0, 64\]"),
    # Numbers an attacker writes are bounded before anything grows with them.
    ({"n_layers": 10**9}, "n_layers=1000000000 is more than 4096, far beyond any Llama"),
    ({"dim": 2**40, "n_heads": 2**20}, "dim=1099511627776 is more than 131072"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000 is more than 16777216"),
    ({"multiple_of": 10**15}, "multiple_of=1000000000000000 is more than 1048576"),
    ({"n_layers": True}, "n_layers must be a positive integer, got True"),
    # Booleans are booleans and floats are finite.
    ({"use_scaled_rope": "no"}, "use_scaled_rope must be true or false, got 'no'"),
    ({"use_scaled_rope": 0}, "use_scaled_rope must be true or false, got 0"),
    ({"norm_eps": float("inf")}, "norm_eps must be a finite number, got inf"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number, got nan"),
    ({"norm_eps": 5.0}, r"norm_eps must be in \(0, 1\)"),
    ({"norm_eps": "1e-5"}, "norm_eps must be a finite number, got '1e-5'"),
    ({"ffn_dim_multiplier": float("inf")}, "ffn_dim_multiplier must be a finite number, got inf"),
    ({"ffn_dim_multiplier": True}, "ffn_dim_multiplier must be a finite number, got True"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number"),
])
def test_impossible_shapes(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_params({**LLAMA3_8B, **change})


def test_from_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        ModelArgs.from_json(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        ModelArgs.from_json(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        ModelArgs.from_json(tmp_path / "params.json")
    (tmp_path / "params.json").write_text(json.dumps({**LLAMA3_8B, "n_heads": 30}))
    with pytest.raises(ValueError, match=r"params.json: n_heads=30 does not divide"):
        ModelArgs.from_json(tmp_path / "params.json")


@pytest.mark.parametrize("text, message", [
    ('{"dim": 4096, "norm_eps": Infinity}', "Infinity is not a number JSON allows"),
    ('{"ffn_dim_multiplier": NaN}', "NaN is not a number JSON allows"),
    ('{"ffn_dim_multiplier": -Infinity}', "-Infinity is not a number JSON allows"),
    ('{"norm_eps": 1e999}', "norm_eps must be a finite number, got inf"),
    ('{"dim": ' + "9" * 5000 + "}", "is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, r"is not valid JSON \(nested too deeply\)"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, r"nested too deeply"),
])
def test_hostile_json_is_refused_with_a_message(tmp_path, text, message):
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_json(tmp_path / "params.json")


def test_oversized_params_json_is_refused_before_reading(tmp_path):
    path = tmp_path / "params.json"
    with open(path, "wb") as f:
        f.truncate(5 * 1024**3)  # sparse: 5 GB that would otherwise be read whole
    with pytest.raises(ValueError, match=r"params.json is 5,368,709,120 bytes, more than the 1,048,576"):
        ModelArgs.from_json(path)
