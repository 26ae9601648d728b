"""The Llama transformer, built from fairscale model-parallel layers.

One definition serves Llama 2, Llama 3 and Llama 3.1 and every
model-parallel size: each rank holds `1/mp` of the attention heads and of the
feed-forward hidden units, and the layers all-reduce or all-gather where the
math needs the whole vector.

This module knows no kernels: everything here is PyTorch's operators.
Faster kernels change a built model from outside (llama/kernels): they swap
leaf layers (the parallel linears, RMSNorm, SwiGLU) for modules that compute
the same, and may take over a whole decoding step through one hook,
`Transformer.decode_hook` (a compiled block, or our CPU kernels' step of
every block in one call). A hook that declines (returns None) leaves the
step to the modules, so the model always runs without one.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from .weights.args import ModelArgs, rope_frequencies
from .weights.schema import EmbeddingLayout, kv_replication


def _keep(x):  # init_method: weights come from the checkpoint, never from an initializer
    return x


def _meta_weights(layer: nn.Module) -> nn.Module:
    """Replaces a fairscale layer's weight by a meta tensor of the same shape.

    fairscale allocates its parameters with the legacy `torch.Tensor(rows, cols)`
    constructor, which ignores the `torch.device("meta")` context: without this,
    building a 70B model would reserve its full size in float32 before the real
    weights are assigned. Doing it layer by layer keeps that waste to one
    (never touched, so never resident) layer.
    """
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
    return layer


@contextlib.contextmanager
def _without_fairscale_init():
    """Turns off fairscale's weight initialization while the model is built.

    With more than one rank it builds each layer's full master weight and
    copies this rank's slice out of it; under the meta device that copy fails
    (meta to CPU), and it would be wasted work anyway: the weights come from
    the checkpoint.
    """
    original = fs_layers._initialize_affine_weight
    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fs_layers._initialize_affine_weight = original


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as Meta does), then scale in the model dtype.
        xf = x.float()
        mean_square = torch.sum(xf * xf, dim=-1, keepdim=True).div_(xf.shape[-1])  # fewer calls than .mean()
        return (xf * torch.rsqrt(mean_square.add_(self.eps))).to(x.dtype) * self.weight


def rope_table(args: ModelArgs, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position up to max_seq_len, laid out for `apply_rotary_emb`:
    each (max_seq_len, 1, head_dim/2, 2), fp32, cos as (cos, cos), sin as (-sin, sin)."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta, args.use_scaled_rope)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)[:, None, :, None]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1).to(device), torch.cat([-sin, sin], -1).to(device)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x[2i], x[2i+1]) — Meta's interleaved layout — in fp32.

    x: (bs, seq, heads, head_dim), any strides with the last one 1 (a slice
    of the fused q|k|v projection is fine); cos, sin: (bs or 1, seq, 1,
    head_dim/2, 2) from `rope_table`, at each token's own position. Computes
    (x0 cos - x1 sin, x1 cos + x0 sin), Meta's complex product, without
    complex tensors (CPU bf16 has none, inductor generates no code for them)
    and in few operations.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (bs, seq, heads, head_dim/2, 2)
    return (pairs * cos + pairs.flip(-1) * sin).flatten(-2).to(x.dtype)


@dataclass
class AttentionInputs:
    """Where the tokens of one forward pass sit; built once per pass, read by every layer.

    Each token has its own KV-cache row and position, so rows of one batch can
    be at different positions (continuous batching) and several prompts can
    share one pass (packed prefill).
    """

    cos: torch.Tensor  # (bs or 1, seq, 1, head_dim/2, 2), fp32: rope_table at each token's position
    sin: torch.Tensor
    cache_rows: torch.Tensor  # (bs, seq): the KV-cache row each token's keys and values go to
    cache_pos: torch.Tensor  # (bs, seq): and their position there
    # True: the queries attend to this pass's own keys (fresh prompts packed in one
    # row); False: to cache rows 0..bs-1, positions 0..kv_len-1.
    self_attention: bool
    kv_len: int
    # None: plainly causal (or, for one query per row, every cached key up to
    # kv_len). Else a bool mask (True = may attend) broadcastable to
    # (bs, heads, seq, keys), or, for one query per row, an additive float
    # bias (bs, 1, 1, kv_len).
    mask: Optional[torch.Tensor]
    # Prompts continuing cached prefixes (Transformer.prefill with starts): the
    # keys are gathered from the cache, key j at (key_rows[j], key_pos[j]),
    # after this pass's own are written; `mask` is then (seq, keys). None otherwise.
    key_rows: Optional[torch.Tensor] = None
    key_pos: Optional[torch.Tensor] = None


def local_kv_heads(n_kv_heads: int, mp_size: int) -> int:
    """KV heads each of `mp_size` ranks holds (replicated where there are
    fewer KV heads than ranks); ValueError where they cannot be split."""
    return n_kv_heads * kv_replication(n_kv_heads, mp_size) // mp_size


def cache_shape(args: ModelArgs, mp_size: int) -> Tuple[int, int, int, int]:
    """One layer's K (and V) cache on each of `mp_size` ranks, as
    Transformer.setup_caches allocates it: (max_batch_size, local KV heads,
    max_seq_len, head_dim)."""
    return args.max_batch_size, local_kv_heads(args.n_kv_heads, mp_size), args.max_seq_len, args.head_dim


def cache_bytes(args: ModelArgs, mp_size: int, dtype: torch.dtype) -> int:
    """Bytes one rank allocates in Transformer.setup_caches (every layer's K
    and V cache in `dtype`, and the RoPE table), from the args alone: what
    memory planning checks before anything is built."""
    try:
        shape = cache_shape(args, mp_size)
    except ValueError:  # the split is refused later, with the fix; plan for one head a rank
        shape = (args.max_batch_size, max(1, args.n_kv_heads // mp_size), args.max_seq_len, args.head_dim)
    kv = 2 * args.n_layers * math.prod(shape) * dtype.itemsize
    rope = 3 * args.max_seq_len * (args.head_dim // 2) * 4  # angles, cos and sin in fp32, while rope_table runs
    return kv + rope


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp_size = fs_init.get_model_parallel_world_size()
        if args.n_heads % mp_size:
            raise ValueError(f"{mp_size} model-parallel ranks cannot split {args.n_heads} attention heads evenly")
        replicas = kv_replication(args.n_kv_heads, mp_size)
        self.n_local_heads = args.n_heads // mp_size
        self.n_local_kv_heads = local_kv_heads(args.n_kv_heads, mp_size)
        self.head_dim = args.head_dim

        # wq, wk and wv as one matmul (one call instead of three per decoded
        # token); each rank's rows are its q, k and v shards, concatenated at
        # load (Transformer._fuse_projections).
        qkv_out = (args.n_heads + 2 * args.n_kv_heads * replicas) * self.head_dim
        self.wqkv = _meta_weights(ColumnParallelLinear(args.dim, qkv_out, bias=False, gather_output=False, init_method=_keep))
        self.wo = _meta_weights(RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_keep))
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None
        self.cache_sets: list = []  # (cache_k, cache_v) of each KV-cache set (Transformer.setup_caches)

    def allocate_cache(self, shape: Tuple[int, int, int, int], device, dtype) -> None:
        """Zeroed K and V caches of `shape` (cache_shape's, for this layer's heads)."""
        if shape[1] != self.n_local_kv_heads or shape[3] != self.head_dim:
            raise ValueError(f"a KV cache of shape {shape} does not fit {self.n_local_kv_heads} local KV heads "
                             f"of {self.head_dim} values")
        self.cache_k = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_v = torch.zeros(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        n_q, n_kv = self.n_local_heads, self.n_local_kv_heads
        qkv = self.wqkv(x).view(bsz, seqlen, n_q + 2 * n_kv, self.head_dim)  # heads: q, then k, then v
        # q and k rotated in one pass: (bs, seq, local_heads, head_dim) and (bs, seq, local_kv_heads, head_dim)
        xq, xk = apply_rotary_emb(qkv[:, :, : n_q + n_kv], inputs.cos, inputs.sin).split([n_q, n_kv], dim=2)
        xv = qkv[:, :, n_q + n_kv :]

        # cache[row, :, pos] for every token: indices (bs, seq) around a slice give (bs, seq, kv_heads, head_dim).
        self.cache_k[inputs.cache_rows, :, inputs.cache_pos] = xk
        self.cache_v[inputs.cache_rows, :, inputs.cache_pos] = xv
        if inputs.key_rows is not None:  # each prompt attends to its row's cached prefix and its own tokens
            keys = self.cache_k[inputs.key_rows, :, inputs.key_pos].transpose(0, 1)[None]  # (1, local_kv_heads, keys, head_dim)
            values = self.cache_v[inputs.key_rows, :, inputs.key_pos].transpose(0, 1)[None]
            out = self._attend(xq, keys, values, inputs.mask)
        elif inputs.self_attention:
            out = self._attend(xq, xk.transpose(1, 2), xv.transpose(1, 2), inputs.mask)
        elif seqlen == 1:
            out = self._attend_one(xq, bsz, inputs.kv_len, inputs.mask)
        else:
            keys = self.cache_k[:bsz, :, : inputs.kv_len]  # (bs, local_kv_heads, kv_len, head_dim)
            values = self.cache_v[:bsz, :, : inputs.kv_len]
            out = self._attend(xq, keys, values, inputs.mask)
        return self.wo(out.reshape(bsz, seqlen, -1))

    @staticmethod
    def _attend(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention for several new positions (prefill): SDPA. Returns (bs, seq, local_heads, head_dim)."""
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )  # (bs, local_heads, seq, head_dim)
        return out.transpose(1, 2)

    def _attend_one(self, xq: torch.Tensor, bsz: int, kv_len: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention for one new position per row (decoding), as two batched matmuls.

        Decoding spends most of its attention time in SDPA's overhead on CPU
        (2-4x this in bf16, measured). Each KV head's query heads form one
        batch entry, so grouped-query attention needs no repeated keys, and
        the cache slice is a plain strided batch. Rows at different positions
        get `bias` (-inf past each row's own position). Returns (bs, 1, local_heads, head_dim).
        """
        n_kv, rep, hd = self.n_local_kv_heads, self.n_local_heads // self.n_local_kv_heads, self.head_dim
        q = xq.reshape(bsz * n_kv, rep, hd)  # query head h uses KV head h // rep
        keys = self.cache_k[:bsz].view(bsz * n_kv, -1, hd)[:, :kv_len]  # (bs * kv_heads, kv_len, head_dim)
        values = self.cache_v[:bsz].view(bsz * n_kv, -1, hd)[:, :kv_len]
        scores = (torch.bmm(q, keys.transpose(1, 2)) * hd**-0.5).float()  # (bs * kv_heads, rep, kv_len)
        if bias is not None:
            scores = (scores.view(bsz, n_kv, rep, kv_len) + bias).view(bsz * n_kv, rep, kv_len)
        probs = torch.softmax(scores, dim=-1).type_as(q)
        return torch.bmm(probs, values).view(bsz, 1, self.n_local_heads, hd)

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` cached positions of row `src` to row `dst`."""
        self.cache_k[dst, :, :length] = self.cache_k[src, :, :length]
        self.cache_v[dst, :, :length] = self.cache_v[src, :, :length]

    def read_cache(self, row: int, start: int, length: int) -> torch.Tensor:
        """A copy of positions start.. start+length-1 of `row`: (2, local_kv_heads, length, head_dim), K then V."""
        return torch.stack([self.cache_k[row, :, start:start + length], self.cache_v[row, :, start:start + length]])

    def write_cache(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Puts `kv` (read_cache's layout) at positions start.. of `row`."""
        length = kv.shape[2]
        self.cache_k[row, :, start:start + length] = kv[0]
        self.cache_v[row, :, start:start + length] = kv[1]


class SwiGLU(nn.Module):
    """silu(gate) * up of gate_up (..., 2 * hidden) = gate | up, the fused w13's
    output. A leaf of its own, so that kernels can swap it for a fused one."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        # w1 (gate) and w3 (up) as one matmul, as Attention.wqkv.
        self.w13 = _meta_weights(ColumnParallelLinear(dim, 2 * hidden_dim, bias=False, gather_output=False, init_method=_keep))
        self.w2 = _meta_weights(RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_keep))
        self.swiglu = SwiGLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.swiglu(self.w13(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.alone = fs_init.get_model_parallel_world_size() == 1  # no collective inside the block

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), inputs)
        return h + self.feed_forward(self.ffn_norm(h))


# A decoding hook: (model, h (bs, 1, dim) after the embedding, inputs) -> the
# last block's output, or None (Transformer.decode_hook).
DecodeHook = Callable[["Transformer", torch.Tensor, AttentionInputs], Optional[torch.Tensor]]

# Weights the model holds as one, and the checkpoint weights (Meta's names)
# each is concatenated from, in order.
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


class Transformer(nn.Module):
    """Build it under `torch.device("meta")`, load a rank's weights under
    Meta's names with `load_state_dict(..., assign=True)`, then call
    `setup_caches` once."""

    def __init__(self, params: ModelArgs, embedding_layout: EmbeddingLayout = "vocab", layers: Optional[range] = None):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError("vocab_size must be resolved (from the tokenizer) before building the model")
        self.params = params
        self.embedding_layout = embedding_layout
        # A pipeline stage (llama/engine/runner.py) holds only `layers` (global
        # indices, all by default), the first stage the embedding, the last the
        # output; every stage the final norm (dim values: the model's device).
        self.layer_ids = range(params.n_layers) if layers is None else layers
        embedding_cls = VocabParallelEmbedding if embedding_layout == "vocab" else ParallelEmbedding
        with _without_fairscale_init():
            self.tok_embeddings = (_meta_weights(embedding_cls(params.vocab_size, params.dim, init_method=_keep))
                                   if self.layer_ids.start == 0 else None)
            self.layers = nn.ModuleList(TransformerBlock(params) for _ in self.layer_ids)
            self.output = (_meta_weights(ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_keep))
                           if self.layer_ids.stop == params.n_layers else None)
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.rope_cos: Optional[torch.Tensor] = None
        self.rope_sin: Optional[torch.Tensor] = None
        self.cache_sets = 0  # KV-cache sets allocated (setup_caches), and the one selected
        self.cache_set = 0
        # Set from outside (llama/kernels: compiled.compile_decode, fused.use_fused_decoding):
        # runs every block of a one-token-a-row pass in its own way, and returns
        # the last block's output (bs, 1, dim), or None to leave it to the modules.
        self.decode_hook: Optional[DecodeHook] = None
        self._register_load_state_dict_pre_hook(self._fuse_projections)

    def _fuse_projections(self, state_dict, prefix, *args) -> None:
        """Concatenates a rank's wq|wk|wv and w1|w3 shards (Meta's names) into
        the fused weights, as a state-dict hook: checkpoints keep Meta's layout.
        A pipeline stage's layers keep their global numbers in checkpoints and
        are renumbered from 0 here."""
        for local, i in enumerate(self.layer_ids):
            for fused, parts in FUSED.items():
                names = [f"{prefix}layers.{i}.{part}.weight" for part in parts]
                if all(n in state_dict for n in names):
                    state_dict[f"{prefix}layers.{i}.{fused}.weight"] = torch.cat([state_dict.pop(n) for n in names])
            if local != i:
                for key in [k for k in state_dict if k.startswith(f"{prefix}layers.{i}.")]:
                    state_dict[f"{prefix}layers.{local}.{key[len(f'{prefix}layers.{i}.'):]}"] = state_dict.pop(key)

    def checkpoint_sources(self) -> Dict[str, Tuple[str, ...]]:
        """Each linear layer of this model (its module path) and the checkpoint
        weights (Meta's names, global layer numbers) whose rows it holds, in
        order: what _fuse_projections concatenates, for weights that reach
        the layers another way (stored quantized, llama/builder.py)."""
        out: Dict[str, Tuple[str, ...]] = {}
        for local, i in enumerate(self.layer_ids):
            for module in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
                out[f"layers.{local}.{module}"] = tuple(f"layers.{i}.{part}.weight" for part in FUSED.get(module, (module,)))
        if self.output is not None:
            out["output"] = ("output.weight",)
        return out

    def setup_caches(self, device, dtype, sets: int = 1) -> None:
        """Allocates the KV cache and the RoPE table on `device` (after weights are loaded).

        `sets` > 1: the max_batch_size rows split into that many cache sets of
        max_batch_size / sets rows each (the engine's lanes, one per pipeline
        stage, llama/engine/engine.py), the same memory in all; set 0 is
        selected, `select_cache` swaps. Called again, it frees the old cache
        before allocating the new one. ValueError unless `sets` divides
        max_batch_size."""
        batch = self.params.max_batch_size
        if isinstance(sets, bool) or not isinstance(sets, int) or sets < 1 or batch % sets:
            raise ValueError(f"cannot split max_batch_size={batch} KV-cache rows into {sets!r} equal cache sets: "
                             f"give a max_batch_size that is a multiple of {sets!r}")
        self.rope_cos, self.rope_sin = rope_table(self.params, device)
        shape = cache_shape(self.params, fs_init.get_model_parallel_world_size())
        shape = (batch // sets, *shape[1:])
        for layer in self.layers:
            a = layer.attention
            a.cache_k = a.cache_v = None
            a.cache_sets = []  # dropped before the new sets are allocated
            for _ in range(sets):
                a.allocate_cache(shape, device, dtype)
                a.cache_sets.append((a.cache_k, a.cache_v))
        self.cache_sets = sets
        self.select_cache(0)

    def select_cache(self, index: int) -> None:
        """Makes KV-cache set `index` the one every pass reads and writes (rows
        0.. of that set): each layer's cache_k / cache_v attribute is swapped,
        nothing is copied. The fused decoding hook keys its native state by
        those tensors, so it keeps one per set."""
        if not 0 <= index < self.cache_sets:
            raise IndexError(f"KV-cache set {index} does not exist: the model has {self.cache_sets} (setup_caches)")
        for layer in self.layers:
            a = layer.attention
            a.cache_k, a.cache_v = a.cache_sets[index]
        self.cache_set = index

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos, *, last_logits_only: bool = False,
                gather_logits: bool = True) -> torch.Tensor:
        """Runs `tokens` (bs, seq) in KV-cache rows 0..bs-1 and fills the cache.

        `start_pos` is the position of each row's first token: an int for the
        whole batch, or a tensor (bs,) with one per row. Each row attends to
        its own cached positions before its tokens and causally among them.
        Returns float logits (bs, seq, vocab) for every position, or
        (bs, 1, vocab) for the last one if `last_logits_only` (what decoding needs).
        With `gather_logits=False`, only this rank's slice of the vocabulary
        (vocab / world size consecutive ids, rank 0 first), without the gather.
        A pipeline stage after the first takes the previous stage's hidden
        state (bs, seq, dim) as `tokens`; one before the last returns its own.
        """
        bsz, seqlen = tokens.shape[:2]
        inputs = self._inputs_at(bsz, seqlen, start_pos, tokens.device)
        h = self._layers(tokens, inputs)
        if self.output is None:
            return h  # (bs, seq, dim): the next stage's input
        if last_logits_only:
            h = h[:, -1:]
        if not gather_logits:
            out = self.output
            local = out.matmul(self.norm(h)) if hasattr(out, "matmul") else F.linear(self.norm(h), out.weight)
            return local.float()  # (bs, seq or 1, vocab / world)
        return self.output(self.norm(h)).float()  # (bs, seq or 1, vocab)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                all_logits: Sequence[bool] = (), hidden: Optional[torch.Tensor] = None,
                starts: Optional[Sequence[int]] = None):
        """Runs prompts in one pass, packed end to end without padding, each
        into its own KV-cache row.

        Fresh prompts (from position 0) attend only to themselves (a
        block-diagonal causal mask), so their logits equal those of running
        each alone. With `starts`, prompt i already has its first `starts[i]`
        positions in its row (a cached prefix, llama/engine/prefix_cache.py):
        only its tokens from there run, at their own positions, attending to
        the row's cached keys before them. Returns, per prompt, float logits
        (1, vocab) of its last position, or (len - start, vocab) of every
        position run where `all_logits[i]` is true. A pipeline stage after the
        first takes the previous stage's `hidden` (1, total run, dim); one
        before the last returns its own instead of logits.
        """
        lens = [len(p) for p in prompts]
        if max(lens) > self.params.max_seq_len:
            raise ValueError(f"a prompt of {max(lens)} tokens exceeds max_seq_len={self.params.max_seq_len}")
        if starts is not None and any(starts):
            return self._prefill_after(prompts, rows, all_logits, hidden, list(starts))
        device = self.norm.weight.device
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]  # (1, total)
        seg = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(lens, device=device))
        first = torch.tensor([0] + lens[:-1], device=device).cumsum(0)  # each prompt's first index in the pass
        pos = torch.arange(tokens.shape[1], device=device) - first[seg]  # each prompt counts from 0
        mask = None
        if len(prompts) > 1:
            mask = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])  # (total, total)
        inputs = AttentionInputs(
            cos=self.rope_cos[pos][None], sin=self.rope_sin[pos][None],
            cache_rows=torch.tensor(rows, device=device)[seg][None], cache_pos=pos[None],
            self_attention=True, kv_len=0, mask=mask,
        )
        h = self._layers(tokens if hidden is None else hidden, inputs)
        return self._prefill_logits(h, lens, all_logits)

    def _prefill_after(self, prompts, rows, all_logits, hidden, starts):
        """prefill's pass for prompts continuing cached prefixes: the queries
        are the new tokens, packed; the keys of each are its own row's
        positions 0..its last, gathered from the cache (its new keys are
        written there first)."""
        device = self.norm.weight.device
        for p, start in zip(prompts, starts):
            if not 0 <= start < len(p):
                raise ValueError(f"a cached prefix of {start} tokens leaves nothing to run of a {len(p)}-token prompt")
        lens = [len(p) - s for p, s in zip(prompts, starts)]
        tokens = torch.tensor([t for p, s in zip(prompts, starts) for t in p[s:]], dtype=torch.long, device=device)[None]
        seg = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(lens, device=device))
        first = torch.tensor([0] + lens[:-1], device=device).cumsum(0)
        start_t = torch.tensor(starts, device=device)
        pos = torch.arange(tokens.shape[1], device=device) - first[seg] + start_t[seg]  # (total,): own positions
        ends = [s + n for s, n in zip(starts, lens)]
        key_seg = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(ends, device=device))
        key_pos = torch.cat([torch.arange(e, device=device) for e in ends])  # (keys,)
        row_t = torch.tensor(rows, device=device)
        mask = (seg[:, None] == key_seg[None, :]) & (key_pos[None, :] <= pos[:, None])  # (total, keys)
        inputs = AttentionInputs(
            cos=self.rope_cos[pos][None], sin=self.rope_sin[pos][None],
            cache_rows=row_t[seg][None], cache_pos=pos[None], self_attention=False, kv_len=0, mask=mask,
            key_rows=row_t[key_seg], key_pos=key_pos,
        )
        h = self._layers(tokens if hidden is None else hidden, inputs, hook=False)
        return self._prefill_logits(h, lens, all_logits)

    def _prefill_logits(self, h: torch.Tensor, lens: Sequence[int], all_logits: Sequence[bool]):
        """Per packed prompt of `lens` tokens, the logits prefill returns (h: (1, total, dim))."""
        if self.output is None:
            return h  # (1, total, dim): the next stage's input
        h = h[0]  # (total, dim)
        ends = torch.tensor(lens).cumsum(0).tolist()
        want_all = list(all_logits) + [False] * (len(lens) - len(all_logits))
        picks = [torch.arange(e - n, e, device=h.device) if full else torch.tensor([e - 1], device=h.device)
                 for n, e, full in zip(lens, ends, want_all)]
        logits = self.output(self.norm(h[torch.cat(picks)])).float()  # (picked, vocab)
        return list(logits.split([len(p) for p in picks]))

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` cached positions of row `src` to row `dst`, in every layer."""
        for layer in self.layers:
            layer.attention.move_cache_row(src, dst, length)

    def read_cache(self, row: int, start: int, length: int) -> torch.Tensor:
        """A copy of positions start..start+length-1 of KV-cache row `row`, every
        layer of this model: (layers, 2, local_kv_heads, length, head_dim)."""
        return torch.stack([layer.attention.read_cache(row, start, length) for layer in self.layers])

    def write_cache(self, row: int, start: int, kv: torch.Tensor) -> None:
        """Puts `kv` (read_cache's layout) at positions start.. of row `row`, in every layer."""
        for layer, layer_kv in zip(self.layers, kv):
            layer.attention.write_cache(row, start, layer_kv)

    def _layers(self, tokens: torch.Tensor, inputs: AttentionInputs, hook: bool = True) -> torch.Tensor:
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)  # (bs, seq, dim)
        if hook and tokens.shape[1] == 1 and self.decode_hook is not None:  # decoding, compiled or fused
            out = self.decode_hook(self, h, inputs)
            if out is not None:
                return out
        for layer in self.layers:
            h = layer(h, inputs)
        return h

    def _inputs_at(self, bsz: int, seqlen: int, start_pos, device) -> AttentionInputs:
        """AttentionInputs for rows 0..bs-1 starting at `start_pos` (int or (bs,) tensor)."""
        max_seq_len = self.params.max_seq_len
        if isinstance(start_pos, int):
            if start_pos < 0 or start_pos + seqlen > max_seq_len:
                raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len={max_seq_len}")
            pos = torch.arange(start_pos, start_pos + seqlen, device=device)[None].expand(bsz, seqlen).contiguous()
            kv_len = start_pos + seqlen
            if seqlen == 1 or start_pos == 0:
                mask = None  # one query sees the whole cache; a fresh chunk is plainly causal
            else:  # query i sits at start_pos + i and sees keys 0..start_pos + i
                mask = torch.ones(seqlen, kv_len, dtype=torch.bool, device=device).tril(diagonal=start_pos)
            cos, sin = self.rope_cos[pos[:1]], self.rope_sin[pos[:1]]
        else:
            start = start_pos.to(device=device, dtype=torch.long)
            if int(start.min()) < 0 or int(start.max()) + seqlen > max_seq_len:
                raise ValueError(f"positions up to {int(start.max()) + seqlen - 1} exceed max_seq_len={max_seq_len}")
            pos = start[:, None] + torch.arange(seqlen, device=device)  # (bs, seq)
            kv_len = int(start.max()) + seqlen
            visible = torch.arange(kv_len, device=device)[None, None, :] <= pos[:, :, None]  # (bs, seq, kv_len)
            if seqlen == 1:
                mask = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))[:, None]
            else:
                mask = visible[:, None]  # (bs, 1, seq, kv_len)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        rows = torch.arange(bsz, device=device)[:, None].expand(bsz, seqlen)
        return AttentionInputs(cos=cos, sin=sin, cache_rows=rows, cache_pos=pos, self_attention=False,
                               kv_len=kv_len, mask=mask)
