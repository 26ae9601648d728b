"""The prefix cache: KV-cache blocks of earlier prompts and answers, kept
for the requests that start the same way.

A chat client resends the whole conversation each turn, and requests share
system prompts and documents. The engine copies the keys and values of a
request's full blocks of `BLOCK` tokens out of its KV-cache row when its
prompt has been prefilled and again when it leaves its row (finished or
cancelled); a request admitted later whose prompt starts with cached blocks
gets them copied into its row and prefills only the rest.

Design:
* A block is keyed by its tokens and everything before them: key(i) =
  sha256(key(i-1), tokens of block i). A lookup walks a prompt's blocks from
  the first and stops at the first one missing, so a hit is always a whole
  prefix. The value is one tensor (layers, 2, kv_heads, BLOCK, head_dim) of
  this process's layers and heads (a pipeline stage holds its own layers,
  a tensor-parallel rank its own heads).
* The budget is counted in blocks of the whole model (every layer and KV
  head): `capacity = budget_bytes // block_bytes`, the same figure on every
  rank, so every rank evicts the same blocks. A rank holds its share of
  those bytes.
* Least recently used blocks are evicted first. A chain is touched from its
  last block to its first, so a prefix is always more recent than what
  extends it, and eviction trims chains from their ends.
* Never the whole prompt: at least its last token is prefilled, for the
  logits of the first generated token.

Invariants: under torchrun every rank makes the same calls in the same order
(insert and take happen at the engine's step events, which rank 0's plan
makes the same everywhere), so every rank holds the same keys; rank 0's
`match` decides and the others `take` what it decided.

Failure modes: a `take` of blocks this rank does not hold means the ranks
diverged (a bug): RuntimeError, never wrong tokens. Values are bit copies of
the KV cache, but the rest of a prompt is then computed in a pass of another
shape than a full prefill, so logits agree to float rounding (as a request
packed with others does), not bit for bit.
"""

import hashlib
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence

import torch

# Tokens per block: the granularity of reuse. Small enough that a new turn
# reuses nearly all of the conversation, large enough that the bookkeeping
# (a hash and a dict entry per block) is negligible beside the copy.
BLOCK = 32


def block_keys(tokens: Sequence[int], n_blocks: int) -> List[bytes]:
    """The keys of the first `n_blocks` full blocks of `tokens`, each naming the block and its whole prefix."""
    keys, parent = [], b""
    for i in range(n_blocks):
        block = tokens[i * BLOCK:(i + 1) * BLOCK]
        parent = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in block)).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of cached keys and values, at most `capacity` of them, LRU."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("a prefix cache needs room for at least one block")
        self.capacity = capacity
        self._blocks: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()  # least recently used first
        self.reused_tokens = 0  # prompt tokens that were copied from the cache instead of prefilled
        self.evicted_blocks = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self) -> List[bytes]:
        """The blocks' keys, least recently used first (the same on every rank)."""
        return list(self._blocks)

    @property
    def nbytes(self) -> int:
        """Bytes this process holds."""
        return sum(t.nbytes for t in self._blocks.values())

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` are cached (whole blocks, never all of them); touches nothing."""
        n = 0
        for key in block_keys(tokens, (len(tokens) - 1) // BLOCK):
            if key not in self._blocks:
                break
            n += BLOCK
        return n

    def take(self, tokens: Sequence[int], n_tokens: int) -> List[torch.Tensor]:
        """The blocks of the first `n_tokens` (a multiple of BLOCK that `match` gave), touched as used."""
        keys = block_keys(tokens, n_tokens // BLOCK)
        missing = sum(k not in self._blocks for k in keys)
        if missing:
            raise RuntimeError(f"the prefix cache lacks {missing} of the {len(keys)} blocks rank 0 found: the ranks' "
                               "caches diverged (every rank must run the same steps with the same prefix cache budget)")
        self._touch(keys)
        self.reused_tokens += n_tokens
        return [self._blocks[k] for k in keys]

    def insert(self, tokens: Sequence[int], n_valid: int, read: Callable[[int, int], torch.Tensor]) -> None:
        """Keeps the full blocks among the first `n_valid` positions of `tokens`;
        `read(start, length)` copies a range of positions out of the KV cache."""
        keys = block_keys(tokens, min(n_valid, len(tokens)) // BLOCK)
        for i, key in enumerate(keys):
            if key not in self._blocks:
                self._blocks[key] = read(i * BLOCK, BLOCK)
        self._touch(keys)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
            self.evicted_blocks += 1

    def _touch(self, keys: List[bytes]) -> None:
        for key in reversed(keys):  # the first block ends most recent: chains are trimmed from their ends
            self._blocks.move_to_end(key)


def capacity_for(budget_bytes: int, params, element_size: int) -> Optional[int]:
    """Blocks of the whole model (`params`: every layer and KV head, at `element_size`
    bytes a value) that fit in `budget_bytes`; None for 0 (no cache). ValueError names a bad budget."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"prefix_cache_bytes must be a whole number of bytes >= 0 (0 turns the prefix cache off), "
                         f"got {budget_bytes!r}")
    if budget_bytes == 0:
        return None
    block_bytes = params.n_layers * 2 * params.n_kv_heads * BLOCK * params.head_dim * element_size
    if budget_bytes < block_bytes:
        raise ValueError(f"prefix_cache_bytes={budget_bytes} holds no block: one block of {BLOCK} tokens of this model "
                         f"takes {block_bytes} bytes ({block_bytes / 2**20:.2f} MiB); give at least that, or 0 for no cache")
    return budget_bytes // block_bytes
