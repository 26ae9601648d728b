"""How the next token is chosen: `SamplingParams` per request, and the
functions that apply them to one decoding step's logits.

Order of operations (as in Hugging Face's and llama.cpp's samplers):
penalties, then temperature (0 = greedy: arg-max, exact), then top-k, top-p
and min-p, then one draw from the request's own random generator, so a
seeded request gives the same tokens whatever else shares its batch.
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Invalid values raise `ValueError` naming the field.

    Attributes:
        temperature: 0 means greedy (arg-max); higher flattens the distribution.
        top_p: Keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
        top_k: Keep the k most likely tokens; 0 keeps all.
        min_p: Drop tokens less likely than min_p times the most likely one; 0 keeps all.
        repetition_penalty: Divides the (positive) logits of tokens already in the
            prompt or the answer, multiplies negative ones; 1 is off (llama.cpp, HF).
        presence_penalty: Subtracted once from the logit of every token already
            generated, in [-2, 2] (OpenAI).
        frequency_penalty: Subtracted per earlier occurrence in the answer, in [-2, 2] (OpenAI).
        seed: Seeds this request's own generator; None draws one from torch's
            global generator (so `torch.manual_seed` still makes runs repeatable).
        stop: Strings that end the answer; the text is cut right before the first
            one, even when it spans several tokens.
        max_tokens: Most tokens to generate; None means until the context is full.
        logprobs: Report each generated token's log-probability.
        top_logprobs: Also report this many most likely alternatives per token (implies logprobs).
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = field(default=())
    max_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        _validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


def _check_real(name: str, value, low: float, high: float, low_open=False, high_open=False) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"sampling {name} must be a finite number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"sampling {name} must be in {interval}, got {value!r}")


def _validate(p: SamplingParams) -> None:
    _check_real("temperature", p.temperature, 0.0, 1e6)
    _check_real("top_p", p.top_p, 0.0, 1.0, low_open=True)
    _check_real("min_p", p.min_p, 0.0, 1.0, high_open=True)
    _check_real("repetition_penalty", p.repetition_penalty, 0.0, 1e6, low_open=True)
    _check_real("presence_penalty", p.presence_penalty, -2.0, 2.0)
    _check_real("frequency_penalty", p.frequency_penalty, -2.0, 2.0)
    if not _is_int(p.top_k) or p.top_k < 0:
        raise ValueError(f"sampling top_k must be a non-negative integer (0 = off), got {p.top_k!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < 2**63):
        raise ValueError(f"sampling seed must be an integer in [0, 2**63) or None, got {p.seed!r}")
    if p.max_tokens is not None and (not _is_int(p.max_tokens) or p.max_tokens < 0):
        raise ValueError(f"sampling max_tokens must be a non-negative integer or None, got {p.max_tokens!r}")
    if not isinstance(p.logprobs, bool):
        raise ValueError(f"sampling logprobs must be True or False, got {p.logprobs!r}")
    if not _is_int(p.top_logprobs) or not 0 <= p.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"sampling top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {p.top_logprobs!r}")
    if not isinstance(p.stop, tuple) or len(p.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"sampling stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, "
                         f"got {p.stop!r:.80}")
    for s in p.stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"sampling stop strings must be non-empty strings, got {s!r:.80}")


def apply_penalties(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor,
                    generated: torch.Tensor) -> torch.Tensor:
    """Penalized copy of one row's logits (vocab,).

    context: token ids of the prompt and the answer so far (repetition penalty);
    generated: the answer's ids only (presence and frequency penalties).
    """
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and context.numel():
        seen = torch.unique(context)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and generated.numel():
        counts = torch.bincount(generated, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draws the next token from one row's (penalized) logits (vocab,), temperature > 0."""
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        values, ids = torch.topk(scaled, params.top_k)  # sorted, descending
    else:
        values, ids = torch.sort(scaled, descending=True)
    return int(ids[_draw(torch.softmax(values, dim=-1), params, generator)])


def _draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator,
          n_draws: Optional[int] = None) -> int:
    """Position drawn from `probs` (sorted, descending) after top-p and min-p.

    `probs` may be the head of a longer sorted vector of `n_draws` whose
    tail top-p or min-p drops: then the draw is torch.multinomial's over the
    whole vector (it takes the arg-max of p / q, with q one Exp(1) draw per
    entry), and the generator advances as it would have.
    """
    if params.top_p < 1.0:
        # Meta's rule: drop a token when the mass before it already exceeds top_p.
        probs = torch.where(torch.cumsum(probs, dim=-1) - probs > params.top_p, 0.0, probs)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs[0], 0.0, probs)
    probs = probs / probs.sum()
    if n_draws is None or n_draws == probs.shape[-1]:
        return int(torch.multinomial(probs, 1, generator=generator))
    q = torch.empty(n_draws, dtype=probs.dtype, device=probs.device).exponential_(1, generator=generator)
    return int(torch.argmax(probs / q[:probs.shape[-1]]))


@dataclass
class RowState:
    """What sampling needs to know about one row besides its logits."""

    params: SamplingParams
    generator: Optional[torch.Generator]  # None for greedy rows
    context: torch.Tensor  # prompt + answer ids so far (long)
    generated: torch.Tensor  # answer ids so far (long)


def sample_rows(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Next token (bs,) for each row of `logits` (bs, vocab), each by its own params."""
    next_tokens = torch.argmax(logits, dim=-1)
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy and not p.has_penalties:
            continue  # the arg-max above, exact
        row_logits = apply_penalties(logits[i], p, row.context, row.generated) if p.has_penalties else logits[i]
        if p.greedy:
            next_tokens[i] = torch.argmax(row_logits)
        else:
            next_tokens[i] = sample_one(row_logits, p, row.generator)
    return next_tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0):
    """Log-probabilities (bs,) of `tokens` under the raw `logits` (bs, vocab), and
    the `top_n` most likely (ids, logprobs), each (bs, top_n), or None."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0]
    if not top_n:
        return chosen, None
    values, ids = torch.topk(lp, top_n, dim=-1)
    return chosen, (ids, values)


# -- vocabulary split across ranks: sampling from each rank's best candidates --

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
    scaled = logits.float() if p.greedy else logits.float() / p.temperature
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
    return int(ids[_draw(probs, params, generator, n_draws)])
