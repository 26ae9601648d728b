"""Hugging Face `transformers` LlamaForCausalLM loaded with the same weights
as a Meta checkpoint: an independent implementation to compare against."""

import json
from pathlib import Path

import torch

from llama.weights.args import ModelArgs
from llama.weights.checkpoint import find_shards, load_shard
from llama.weights.schema import model_weights


HF_NAMES = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def meta_to_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0, x1), (x2, x3)...; HF rotates halves.
    Reorder each head's rows from interleaved to half-split."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_model_from_meta(ckpt_dir, vocab_size: int, dtype=torch.float32, attn_implementation: str = "eager"):
    """LlamaForCausalLM with an MP=1 checkpoint's weights (eager attention by
    default: the tests compare against the plainest implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = json.loads((Path(ckpt_dir) / "params.json").read_text())
    args = ModelArgs.from_params({**params, "vocab_size": vocab_size})
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps, max_position_embeddings=131072, rope_parameters=rope,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    (shard,) = find_shards(ckpt_dir)
    meta = load_shard(shard)
    hf = {}
    for name in model_weights(args):  # every weight, by llama/weights/schema.py
        key = name.removesuffix(".weight")
        if key.startswith("layers."):
            _, i, key = key.split(".", 2)
            hf_name = f"model.layers.{i}.{HF_LAYER_NAMES[key]}.weight"
        else:
            hf_name = HF_NAMES[key]
        tensor = meta[name]
        if key in ("attention.wq", "attention.wk"):
            tensor = meta_to_hf_qk(tensor, args.n_heads if key == "attention.wq" else args.n_kv_heads)
        hf[hf_name] = tensor
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in hf.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were on meta
    return model.eval()
