"""Model hyper-parameters: what params.json says, validated, plus runtime limits."""

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from ..common.hf_layout import original_folder_hint
from ..common.jsonfile import read_json_object

# Keys that params.json may hold. Runtime limits (max_batch_size, max_seq_len)
# are not file parameters and are rejected if they appear there.
_RUNTIME_FIELDS = {"max_batch_size", "max_seq_len"}
# Keys that describe how the weights are stored, not the model: params.json may
# hold them (a quantized checkpoint's "quantization", llama/weights/quantized.py)
# and ModelArgs leaves them out.
STORAGE_KEYS = {"quantization"}


# Bounds far above any real model, so that a hostile params.json cannot make the
# loader do work that grows with a number it wrote (10**9 layers) before the
# weights are checked. Runtime limits are bounded by memory (see checkpoint.py).
_LIMITS = {"dim": 1 << 17, "n_layers": 4096, "n_heads": 1 << 14, "n_kv_heads": 1 << 14, "multiple_of": 1 << 20}
_MAX_VOCAB = 1 << 24


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama 2 / 3 / 3.1 transformer.

    Defaults are those of Llama 2 params.json files, which omit `n_kv_heads`
    (plain multi-head attention) and `rope_theta` (10000).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take it from the tokenizer (Llama 2)
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # Llama 3.1 long-context RoPE frequencies

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r:.60}")
        for name, limit in _LIMITS.items():
            if getattr(self, name) > limit:
                raise ValueError(
                    f"{name}={getattr(self, name)} is more than {limit}, far beyond any Llama "
                    f"(405B: dim 16384, 126 layers, vocab 128256); the file is not a real params.json"
                )
        if not (_is_int(self.vocab_size) and (self.vocab_size > 0 or self.vocab_size == -1)):
            raise ValueError(f"vocab_size must be a positive integer or -1, got {self.vocab_size!r:.60}")
        if self.vocab_size > _MAX_VOCAB:
            raise ValueError(f"vocab_size={self.vocab_size} is more than {_MAX_VOCAB}, far beyond any tokenizer")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"use_scaled_rope must be true or false, got {self.use_scaled_rope!r:.60}")
        for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r:.60}")
        if self.ffn_dim_multiplier is not None and not 0 < self.ffn_dim_multiplier <= 64:
            raise ValueError(f"ffn_dim_multiplier must be in (0, 64], got {self.ffn_dim_multiplier!r}")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide dim={self.dim}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension dim/n_heads={self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each KV head between a whole number of query heads"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @classmethod
    def from_params(cls, params: dict, **runtime) -> "ModelArgs":
        """Builds args from a params.json dict plus runtime limits.

        Unknown keys are an error rather than silently ignored: a key this code
        does not understand may change the model (as `use_scaled_rope` did).
        """
        known = {f.name for f in fields(cls)} - _RUNTIME_FIELDS
        for key in STORAGE_KEYS & set(params):
            if not isinstance(params[key], dict):
                raise ValueError(f"params.json's {key!r} must be an object, got {params[key]!r:.60}")
        params = {k: v for k, v in params.items() if k not in STORAGE_KEYS}
        unknown = set(params) - known
        if unknown:
            raise ValueError(
                f"params.json has keys this model does not know: {sorted(unknown)} "
                f"(known keys: {sorted(known)})"
            )
        return cls(**params, **runtime)

    @classmethod
    def from_json(cls, path, **runtime) -> "ModelArgs":
        """Reads and validates a params.json file; errors name the file."""
        path = Path(path)
        params = read_json_object(
            path, missing="a Meta checkpoint directory holds a params.json next to its .pth files"
            + original_folder_hint(path.parent),
            fix="re-download it or restore the original file",
        )
        try:
            return cls.from_params(params, **runtime)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_params(self) -> dict:
        """The params.json dict for these args (runtime limits left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _RUNTIME_FIELDS}


def rope_frequencies(head_dim: int, theta: float, use_scaled: bool):
    """Inverse frequencies of rotary embeddings, a float32 torch tensor of shape (head_dim/2,).

    `use_scaled` applies Llama 3.1's scaling (params.json's use_scaled_rope).
    The weights wing needs them too: llama.cpp's GGUF files store Llama 3.1's
    scaling as a tensor of per-frequency divisors (plain / scaled). torch is
    imported here, not at the top, so that ModelArgs stays importable without it.
    """
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return _llama31_scaling(freqs) if use_scaled else freqs


def _llama31_scaling(freqs, scale_factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     old_context_len: float = 8192.0):
    import torch

    # Llama 3.1 stretches long wavelengths by `scale_factor`, keeps short ones,
    # and blends linearly in between.
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)
