"""How the next token is chosen: `SamplingParams` per request, and the
functions that apply them to one decoding step's logits.

Order of operations (as in Hugging Face's and llama.cpp's samplers):
penalties, then temperature, then top-k, top-p and min-p, then one draw from
the request's own random generator, so a seeded request gives the same tokens
whatever else shares its batch.

Each rule lives in one place:

* greedy or not: `SamplingParams.greedy` (a temperature below GREEDY_BELOW,
  0 included); `SamplingParams.argmax_only` (greedy and no penalties: the
  next token is the arg-max of the raw logits, which lets the engine and the
  tensor-parallel runner skip everything else). Everything that branches on
  greedy reads one of these two.
* temperature: `scaled_logits`, used by the full-vocabulary draw here and by
  the split-vocabulary candidates (vocab_parallel.py).

Invariants: a greedy row never touches a random generator (it has none); a
sampled row advances its generator the same way whichever path draws it;
every accepted temperature gives finite probabilities (see GREEDY_BELOW).
"""

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20

# Temperatures below this are greedy. Dividing by a tiny temperature
# overflows float32 (1e-45 makes every logit +-inf, and softmax of inf - inf
# is NaN, which torch.multinomial refuses); at 1e-5 a logit gap of 1e-3
# already becomes a factor exp(-100) (below float32's smallest normal
# number), so the draw is the arg-max in all but near-exact ties, while
# logits up to about 3e33 still scale to finite values. vLLM uses the same
# floor (_SAMPLING_EPS). No useful sampling temperature is anywhere near it.
GREEDY_BELOW = 1e-5


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Invalid values raise `ValueError` naming the field.

    Attributes:
        temperature: 0 (or anything below GREEDY_BELOW) means greedy (arg-max);
            higher flattens the distribution.
        top_p: Keep the smallest set of tokens whose probability reaches top_p, in [0, 1];
            0 keeps the most likely token alone (greedy, as Meta's reference and OpenAI).
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
        """The next token is the arg-max of the (penalized) logits: the one greedy rule."""
        return self.temperature < GREEDY_BELOW

    @property
    def argmax_only(self) -> bool:
        """The next token is the arg-max of the raw logits: greedy, no penalties."""
        return self.greedy and not self.has_penalties

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
    _check_real("top_p", p.top_p, 0.0, 1.0)  # 0: Meta's rule in `draw` keeps the first token alone
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


def scaled_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`logits` in float32 divided by the temperature (unscaled for greedy
    rows, whose arg-max it does not change): the one place temperature is
    applied. The probabilities are then taken relative to the largest value
    (torch.softmax and torch.logsumexp subtract the maximum), so they stay
    finite for every temperature GREEDY_BELOW lets through."""
    return logits.float() if params.greedy else logits.float() / params.temperature


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """The next token from one row's (penalized) logits (vocab,): the arg-max
    for a greedy row (`generator` unused, may be None), else one draw."""
    if params.greedy:
        return int(torch.argmax(logits))
    scaled = scaled_logits(logits, params)
    if params.top_k and params.top_k < scaled.shape[-1]:
        values, ids = torch.topk(scaled, params.top_k)  # sorted, descending
    else:
        values, ids = torch.sort(scaled, descending=True)
    return int(ids[draw(torch.softmax(values, dim=-1), params, generator)])


def draw(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator,
         n_draws: Optional[int] = None) -> int:
    """Position drawn from `probs` (sorted, descending) after top-p and min-p.

    `probs` may be the head of a longer sorted vector of `n_draws` whose
    tail top-p or min-p drops: then the draw is torch.multinomial's over the
    whole vector (it takes the arg-max of p / q, with q one Exp(1) draw per
    entry), and the generator advances as it would have.
    """
    probs = _truncated(probs, params)
    if n_draws is None or n_draws == probs.shape[-1]:
        return int(torch.multinomial(probs, 1, generator=generator))
    q = torch.empty(n_draws, dtype=probs.dtype, device=probs.device).exponential_(1, generator=generator)
    return int(torch.argmax(probs / q[:probs.shape[-1]]))


def _truncated(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`probs` (sorted, descending) after top-p and min-p, renormalized."""
    if params.top_p < 1.0:
        # Meta's rule: drop a token when the mass before it already exceeds top_p.
        probs = torch.where(torch.cumsum(probs, dim=-1) - probs > params.top_p, 0.0, probs)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs[0], 0.0, probs)
    return probs / probs.sum()


def row_probs(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor,
              generated: torch.Tensor) -> torch.Tensor:
    """The whole distribution (vocab,) float32 that `sample_rows` draws one
    row's token from, given its raw logits (vocab,) and history: penalties,
    temperature, top-k, top-p and min-p, as there; a one-hot at the arg-max
    for a greedy row. Speculative decoding (speculative.py) compares
    proposals against it."""
    if params.has_penalties:
        logits = apply_penalties(logits, params, context, generated)
    if params.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.shape[-1]).float()
    scaled = scaled_logits(logits, params)
    if params.top_k and params.top_k < scaled.shape[-1]:
        values, ids = torch.topk(scaled, params.top_k)
    else:
        values, ids = torch.sort(scaled, descending=True)
    out = torch.zeros(scaled.shape[-1], dtype=torch.float32, device=scaled.device)
    return out.scatter_(0, ids, _truncated(torch.softmax(values, dim=-1), params))


def row_generator(params: SamplingParams, seed: int, device) -> Optional[torch.Generator]:
    """A row's own random generator, seeded once when it is admitted; None for
    a greedy row, which draws nothing."""
    return None if params.greedy else torch.Generator(device=device).manual_seed(seed)


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
        if p.argmax_only:
            continue  # the arg-max above, exact
        row_logits = apply_penalties(logits[i], p, row.context, row.generated) if p.has_penalties else logits[i]
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
