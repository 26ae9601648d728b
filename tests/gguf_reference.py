"""Test helpers for GGUF models: tiny synthetic GGUF files, and independent
references built from a GGUF file (Hugging Face `tokenizers` from its
vocabulary and merges, `transformers`' GGUF model loader, its Jinja chat template)."""

import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges of the tiny vocabulary, in priority order (Ġ is the byte-level space,
# Ċ the newline). As in a trained vocabulary, no token is also the
# concatenation of two other tokens (say "Ġ" + "ll" if "l l" were a merge):
# then tiktoken's ranks and BPE's merges would disagree.
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "ĠĠ ĠĠ", "o n", "Ċ Ċ", "1 2", "Ġ l", "Ġl l",
               "a m", "Ġll am", "Ġllam a"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn": 192}


def byte_chars() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character standing for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in chars)})
    return chars


def tiny_vocab(missing_bytes: Sequence[int] = ()):
    """(tokens, token types, merges): control tokens, then bytes, then merge results, ids in merge order."""
    chars = byte_chars()
    tokens = SPECIALS + [chars[b] for b in range(256) if b not in missing_bytes]
    tokens += [m.replace(" ", "") for m in TINY_MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, list(TINY_MERGES)


LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template, as its GGUF files carry it
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_vocab(tokenizer_path, n_base: Optional[int] = None, specials: Optional[Sequence[str]] = None):
    """(tokens, token types, merges) of Meta's Llama 3 tokenizer.model as a
    GGUF holds them: vocabulary and merges as transformers derives them from
    the tiktoken file (every split of a token into two tokens, as in Llama 3's
    tokenizer.json), then control tokens (Llama 3.1's 256 by default).
    `n_base` keeps only the first n_base ranks (still a complete BPE)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama.text.tokenizer import Tokenizer

    vocab, merges = TikTokenConverter(vocab_file=str(tokenizer_path)).extract_vocab_merges_from_model(str(tokenizer_path))
    n_base = n_base or len(vocab)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:n_base]
    kept = set(tokens)
    merges = [f"{a} {b}" for a, b in merges if a in kept and b in kept and a + b in kept]
    if specials is None:
        specials = sorted(Tokenizer.from_file(tokenizer_path).special_tokens, key=Tokenizer.from_file(tokenizer_path).special_tokens.get)
    return tokens + list(specials), [1] * len(tokens) + [3] * len(specials), merges


def hf_gguf_tokenizer(path, cache_dir: Optional[Path] = None):
    """transformers' tokenizer built from the GGUF file itself (AutoTokenizer, gguf_file=...).

    Building it reads every token and merge through gguf's Python reader: 15 s
    for Llama 3's 128k tokens and 280k merges. With `cache_dir`, the tokenizer
    built is saved there (save_pretrained: tokenizer.json and the chat
    template) under the GGUF's sha256 and the transformers and tokenizers
    versions, and later calls load that: the same file read by the same
    libraries gives the same tokenizer. A different file, or an upgraded
    library, builds afresh.
    """
    import hashlib

    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    if cache_dir is None:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    key = f"{digest.hexdigest()[:32]}-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}"
    saved = Path(cache_dir) / key
    if not saved.is_dir():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        partial = Path(cache_dir) / f".{key}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        tok.save_pretrained(partial)
        try:
            partial.rename(saved)  # atomic: a reader sees the whole folder or none
        except OSError:  # another run saved it first
            shutil.rmtree(partial, ignore_errors=True)
    return AutoTokenizer.from_pretrained(saved)


def write_tiny_gguf(path, arch: str = "llama", tensor_types: Optional[Dict[str, str]] = None, omit: Sequence[str] = (),
                    extra_kv: Optional[dict] = None, extra_tensors: Optional[Dict[str, np.ndarray]] = None,
                    tied: bool = True, missing_bytes: Sequence[int] = (), tokenizer_model: str = "gpt2",
                    pre: str = "smollm", vocab=None, seed: int = 0) -> Dict[str, np.ndarray]:
    """Writes a small random Llama model as GGUF, as llama.cpp lays it out.

    `tensor_types` maps a GGUF tensor name to the type to store it as (default
    F32; "F16", "BF16", "Q8_0", "I32"); `omit` drops metadata keys or tensors.
    Returns the float32 weights written, by GGUF name, shape (out, in).
    """
    import gguf

    tensor_types = tensor_types or {}
    tokens, types, merges = vocab or tiny_vocab(missing_bytes)
    s = TINY_SHAPE
    hd = s["dim"] // s["n_heads"]
    rng = np.random.default_rng(seed)

    def w(rows, cols):
        return (rng.standard_normal((rows, cols)) / cols**0.5).astype(np.float32)

    weights = {"token_embd.weight": rng.standard_normal((len(tokens), s["dim"])).astype(np.float32),
               "output_norm.weight": (1 + 0.1 * rng.standard_normal(s["dim"])).astype(np.float32)}
    if not tied:
        weights["output.weight"] = w(len(tokens), s["dim"]) * 4
    for i in range(s["n_layers"]):
        p = f"blk.{i}."
        weights.update({
            p + "attn_q.weight": w(s["n_heads"] * hd, s["dim"]), p + "attn_k.weight": w(s["n_kv_heads"] * hd, s["dim"]),
            p + "attn_v.weight": w(s["n_kv_heads"] * hd, s["dim"]), p + "attn_output.weight": w(s["dim"], s["n_heads"] * hd),
            p + "ffn_gate.weight": w(s["ffn"], s["dim"]), p + "ffn_down.weight": w(s["dim"], s["ffn"]),
            p + "ffn_up.weight": w(s["ffn"], s["dim"]),
            p + "attn_norm.weight": (1 + 0.1 * rng.standard_normal(s["dim"])).astype(np.float32),
            p + "ffn_norm.weight": (1 + 0.1 * rng.standard_normal(s["dim"])).astype(np.float32),
        })
    weights.update(extra_tensors or {})

    kv = {
        "llama.context_length": ("uint32", 256), "llama.embedding_length": ("uint32", s["dim"]),
        "llama.block_count": ("uint32", s["n_layers"]), "llama.feed_forward_length": ("uint32", s["ffn"]),
        "llama.attention.head_count": ("uint32", s["n_heads"]), "llama.attention.head_count_kv": ("uint32", s["n_kv_heads"]),
        "llama.rope.freq_base": ("float32", 10000.0), "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5),
        "llama.vocab_size": ("uint32", len(tokens)), "llama.rope.dimension_count": ("uint32", hd),
        "tokenizer.ggml.model": ("string", tokenizer_model), "tokenizer.ggml.pre": ("string", pre),
        "tokenizer.ggml.bos_token_id": ("uint32", 1), "tokenizer.ggml.eos_token_id": ("uint32", 2),
        "tokenizer.ggml.padding_token_id": ("uint32", 2), "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.chat_template": ("string", CHATML_TEMPLATE),
    }
    kv.update(extra_kv or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in kv.items():
        if key not in omit:
            getattr(writer, f"add_{kind}")(key.replace("llama.", f"{arch}.", 1), value)
    for key, value in (("tokenizer.ggml.tokens", tokens), ("tokenizer.ggml.token_type", types),
                       ("tokenizer.ggml.merges", merges)):
        if key not in omit:
            writer.add_array(key, value)
    for name, x in weights.items():
        if name in omit:
            continue
        qtype = getattr(gguf.GGMLQuantizationType, tensor_types.get(name, "F32"))
        if qtype == gguf.GGMLQuantizationType.I32:
            writer.add_tensor(name, x.astype(np.int32))
        elif qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quantize(x, qtype))
        else:
            writer.add_tensor(name, gguf.quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def hf_tokenizer_from_gguf(path, special_text_is_text: bool = True):
    """A Hugging Face `tokenizers` BPE built from the GGUF's own vocabulary and
    merges, with SmolLM2's pre-tokenizer (single digits, then GPT-2 byte level),
    as in SmolLM2's tokenizer.json. By default special-token text is encoded as
    text, as our tokenizers do; `special_text_is_text=False` reads it as the
    special token (to tokenize a rendered chat template)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    if fields["tokenizer.ggml.pre"].contents() != "smollm":
        raise ValueError("this reference knows only the smollm pre-tokenizer")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.encode_special_tokens = special_text_is_text
    return tok


def render_chat_template(path, dialog) -> str:
    """The GGUF's chat template rendered for `dialog`, as transformers renders templates."""
    from gguf import GGUFReader
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = GGUFReader(path).fields["tokenizer.chat_template"].contents()
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=dialog, add_generation_prompt=True)


def hf_model_from_gguf(path):
    """transformers' LlamaForCausalLM loaded by its own GGUF loader, fp32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
