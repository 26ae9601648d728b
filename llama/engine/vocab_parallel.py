"""Sampling from logits split by vocabulary across the tensor-parallel ranks
(rank r holds ids r*V/N ..), exchanging each rank's best candidates instead
of its slice of the logits.

Design: per row, each rank sends its log-sum-exp and its k best values with
their global ids (`local_candidates`: penalties and temperature applied by
sampling.py's own functions, token by token, so the values are the bits the
full vector would hold): 1 KB a row with the default 64 candidates, against
4V/N bytes for the slice. Every rank receives the same candidates
(collectives.all_gather_last_dim), builds the same plan
(`plan_from_candidates`) and runs the same draw (`draw_planned`), so every
rank picks the same token without another exchange.

Invariants: where a plan exists, the token and the row's generator state
are the ones sampling.sample_rows gives on the full logits (bit for bit with
top_k, or greedy); a plan is decided for every row before any generator
moves. Failure mode: where the candidates cannot decide some row (a flat
distribution with top_p near 1, a top_k above MAX_CANDIDATES), that step
gathers the full logits instead: slower, never different.

The exchange itself is generic (llama/parallel/collectives.py); the sampling
rules stay here, in the engine.
"""

import math
from typing import Optional, Sequence

import torch
from fairscale.nn.model_parallel.initialize import get_model_parallel_rank

from ..parallel import collectives
from .sampling import RowState, SamplingParams, apply_penalties, draw, sample_rows, scaled_logits

# Candidates each rank sends per row (more when a row's top_k asks for more,
# up to MAX_CANDIDATES): with top_p 0.9 on a trained model's next-token
# distribution, a few dozen tokens usually hold the mass.
CANDIDATES = 64
MAX_CANDIDATES = 1024
# How far the candidates' mass must pass top_p (or their tail stay under
# min_p) for float rounding not to matter.
_MARGIN = 1e-4


def candidate_count(rows: Sequence[RowState]) -> int:
    """Candidates per row this step: CANDIDATES, or a row's larger top_k (at most MAX_CANDIDATES)."""
    ks = [r.params.top_k for r in rows if not r.params.greedy and r.params.top_k <= MAX_CANDIDATES]
    return max([CANDIDATES] + ks)


def local_candidates(logits: torch.Tensor, row: RowState, start: int, k: int) -> torch.Tensor:
    """What one rank sends for one row: float64 (2 + 2k,) = [log-sum-exp of
    its slice, unused, its k best values, their global ids], after penalties
    and temperature, values descending and ties by ascending id.

    `logits` is this rank's slice (ids start .. start + n) of the row's
    logits. Penalties apply token by token, so each rank applies them to its
    own slice; the values are the bits the full vector would hold.
    """
    n, p = logits.shape[-1], row.params
    if p.has_penalties:
        mine = lambda ids: ids[(ids >= start) & (ids < start + n)] - start  # noqa: E731
        logits = apply_penalties(logits, p, mine(row.context), mine(row.generated))
    scaled = scaled_logits(logits, p)
    values, ids = torch.topk(scaled, min(k, n))
    by_id = torch.argsort(ids, stable=True)  # ties: the lowest id first, as torch.argmax
    order = torch.sort(values[by_id], descending=True, stable=True).indices
    values, ids = values[by_id][order], ids[by_id][order] + start
    out = torch.full((2 + 2 * k,), -math.inf, dtype=torch.float64, device=logits.device)
    out[0] = torch.logsumexp(scaled, dim=-1)
    out[1] = 0.0
    out[2:2 + values.shape[0]] = values.double()
    out[2 + k:] = -1.0
    out[2 + k:2 + k + ids.shape[0]] = ids.double()  # ids < 2**53 are exact
    return out


def plan_from_candidates(every: torch.Tensor, params: SamplingParams, vocab: int):
    """From every rank's `local_candidates` of one row (world, 2 + 2k), in
    rank order: (ids, probs, n_draws) to draw from, or None when the
    candidates cannot decide this row exactly (the caller then gathers the
    full logits).

    The candidates above the largest of the ranks' k-th values are exactly
    the head of the globally sorted vector. Sampling from that head is
    sampling from the full vector when the tokens after it are dropped
    anyway: their mass starts beyond top_p, or they are less likely than
    min_p times the best. With top_k <= k the top_k best are all among the
    candidates, and the draw is the full path's, bit for bit.
    """
    k = (every.shape[-1] - 2) // 2
    values, ids = every[:, 2:2 + k].reshape(-1), every[:, 2 + k:].reshape(-1)
    order = torch.sort(values, descending=True, stable=True).indices  # ties: rank order, then id
    values, ids = values[order], ids[order].long()
    if params.greedy:
        return ids[:1], None, None
    top_k = params.top_k if params.top_k < vocab else 0
    if top_k:
        if top_k > k:
            return None
        return ids[:top_k], torch.softmax(values[:top_k].float(), dim=-1), top_k
    threshold = every[:, 1 + k].max()  # the largest k-th value: everything above it is here
    head = int((values > threshold).sum())
    if head == 0:
        return None
    log_total = torch.logsumexp(every[:, 0], dim=0)
    probs = torch.exp(values[:head] - log_total)
    covered = probs.sum() > params.top_p + _MARGIN
    if params.min_p > 0.0:
        covered = covered or math.exp(float(threshold - values[0])) < params.min_p * (1 - _MARGIN)
    if not covered:
        return None
    return ids[:head], probs.float(), vocab


def draw_planned(plan, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """The token of a plan from `plan_from_candidates`."""
    ids, probs, n_draws = plan
    if probs is None:  # greedy
        return int(ids[0])
    return int(ids[draw(probs, params, generator, n_draws)])


def vocab_parallel_sample(local: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """The next token (rows,) of each row from this rank's slice `local`
    (rows, V/N) of logits split by vocabulary, as sampling.sample_rows draws
    it from the full logits (see the module docstring)."""
    n, k = local.shape[-1], candidate_count(rows)
    start = get_model_parallel_rank() * n
    mine = torch.stack([local_candidates(local[i], row, start, k) for i, row in enumerate(rows)])
    every = collectives.all_gather_last_dim(mine)  # (rows, world * (2 + 2k)), rank order
    world = every.shape[-1] // mine.shape[-1]
    every = every.view(len(rows), world, -1)  # (rows, world, 2 + 2k)
    plans = [plan_from_candidates(every[i], row.params, n * world) for i, row in enumerate(rows)]
    if any(plan is None for plan in plans):  # decided before any generator moves
        return sample_rows(collectives.all_gather_last_dim(local), rows)
    return torch.tensor([draw_planned(plan, row.params, row.generator) for plan, row in zip(plans, rows)],
                        dtype=torch.long, device=local.device)
