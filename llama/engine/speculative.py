"""Speculative decoding: propose k tokens per row cheaply, verify them in one
pass of the model, keep the longest prefix the model agrees with.

Decoding one token reads every weight once; a pass over k + 1 tokens reads
them once too, so when proposals are often right a step yields several
tokens for about the cost of one. Two proposers:

* `NgramProposer` (prompt lookup, `--speculate ngram`): the last n tokens
  (n = 3, then 2, then 1) are looked up in the prompt and answer so far; the k
  tokens that followed their most recent earlier occurrence are proposed (the
  most recent one followed by k tokens, if any: in a run of one repeated
  token, the occurrence just before the last is followed by one token only).
  Free, and right where the answer copies its input (repeat, quote, edit,
  summarise a given text).
* `DraftProposer` (`--draft_ckpt_dir`): a smaller model of the same
  vocabulary decodes k tokens ahead. It keeps its own KV-cache rows, one per
  running request (its own allocation, keyed by request id, so the engine's
  row moves need no mirroring), valid up to what the target accepted: at the
  next round it runs only the tokens it has not seen (the target's
  correction, its bonus token), in one packed prefill with `starts`.

Verification (`Speculator.verify`, driven by Engine._decode_speculative): one
forward pass over each running row's last token and its proposals (rows with
fewer are padded: the padding's keys land past the row's valid positions and
are overwritten later). With p the request's processed distribution at each
position (sampling.row_probs: penalties, temperature, top-k/top-p/min-p,
with the proposals before it counted as generated), proposal x is accepted
with probability min(1, p(x) / q(x)) (q the draft's distribution; one-hot
for n-gram and for greedy drafts, so greedy accepts exactly when x is the
arg-max); the first rejection is replaced by a draw from norm(max(p - q, 0));
after all are accepted one more token is drawn from p. This is the rule of
Leviathan et al. and Chen et al. (2023): every emitted token has exactly the
distribution plain decoding gives it, and greedy output is plain greedy
output (up to the float rounding of a k + 1 token pass against a 1 token
one, about 1e-6 in fp32).

Adaptive: each request judges its proposals in windows of `probation`
proposed tokens; a window with fewer than `min_acceptance` of them accepted
pauses the request's proposals for PAUSE_STEPS steps (it decodes plainly,
at plain speed), a pause that doubles with each failed window after it (up
to MAX_PAUSE_STEPS) and starts again from PAUSE_STEPS after a good one. So
an answer that copies its input after a preamble of its own still
speculates where it copies, and free text pays a failed probe only every
few hundred steps. A verification pass costs more than a decode step (it
computes k + 1 positions, and skips the fused one-token CPU kernel), so
proposals that are mostly wrong make decoding slower; see docs/engine.md
for the measured break even.

Limits: one process only (under torchrun the ranks would have to agree on
every proposal and the runner's stages return only last-position logits):
`check_single_process` refuses it. Rows whose request asks for logprobs get
them from the verification logits (the raw logits at each position, as plain
decoding reports).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .sampling import RowState, SamplingParams, row_probs, sample_rows

METHODS = ("ngram", "draft")
NGRAM_MAX = 3  # longest n-gram looked up; then shorter ones down to 1


def check_tokens(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"--speculate_tokens must be a positive number of proposed tokens per step, got {k!r} "
                         "(4 to 8 are typical)")


def check_single_process() -> None:
    """Speculative decoding runs in one process: refuse it under torchrun."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"speculative decoding (--speculate, --draft_ckpt_dir) runs in one process only, and this "
                         f"run has {dist.get_world_size()} ranks: leave them out under torchrun")


def check_draft(draft, target) -> None:
    """The draft must share the target's vocabulary and fit its requests."""
    if draft is target:
        raise ValueError("the draft model is the target model itself: a draft needs its own KV cache; build the "
                         "checkpoint a second time to use it as its own draft")
    dv, tv = draft.params.vocab_size, target.params.vocab_size
    if dv != tv:
        raise ValueError(f"the draft model's vocab_size {dv} differs from the target model's {tv}: a draft must "
                         "use the same tokenizer and vocabulary (e.g. a smaller model of the same family)")
    if draft.params.max_batch_size < target.params.max_batch_size or draft.params.max_seq_len < target.params.max_seq_len:
        raise ValueError(f"the draft model was built for max_batch_size={draft.params.max_batch_size}, "
                         f"max_seq_len={draft.params.max_seq_len}; the target needs at least "
                         f"{target.params.max_batch_size} and {target.params.max_seq_len}: build both alike")


@dataclass
class Proposal:
    tokens: List[int]
    q: Optional[torch.Tensor] = None  # (len(tokens), vocab) the draft's distributions; None: one-hot (n-gram, greedy)


def accept_token(p: torch.Tensor, x: int, q: Optional[torch.Tensor],
                 generator: Optional[torch.Generator]) -> Tuple[bool, Optional[int]]:
    """One step of the acceptance rule for proposal `x` drawn from `q` (vocab,)
    (None: one-hot at x) against the target's distribution `p` (vocab,):
    (True, None) if accepted, else (False, the replacement drawn from
    norm(max(p - q, 0))). A greedy `p` (one-hot) needs no `generator`."""
    px = float(p[x])
    qx = 1.0 if q is None else float(q[x])
    if px >= qx:  # min(1, p/q) = 1: accepted without a draw (always the case for a greedy match)
        return True, None
    if generator is None:  # a one-hot p that is not at x: reject, the arg-max replaces it
        return False, int(torch.argmax(p))
    u = float(torch.rand((), generator=generator, device=p.device))
    if u < px / qx:
        return True, None
    if q is None:
        residual = p.clone()
        residual[x] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    total = float(residual.sum())
    if total <= 0.0:  # p == q up to rounding: any draw from p is right
        residual, total = p, float(p.sum())
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


# Steps a request's proposals pause after a window of poor acceptance; each
# failed window after it doubles the pause, up to MAX_PAUSE_STEPS.
PAUSE_STEPS = 4
MAX_PAUSE_STEPS = 256


@dataclass
class _Stats:
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    window_proposed: int = 0  # since the window began
    window_accepted: int = 0
    paused: int = 0  # steps left without proposals
    pause: int = PAUSE_STEPS  # the next pause's length


class NgramProposer:
    """Prompt lookup: per request, an index of where each token occurs in its
    prompt and answer, extended as tokens arrive."""

    def __init__(self):
        self._index: Dict[int, Tuple[Dict[int, List[int]], int]] = {}

    def propose(self, rows, limits: Sequence[int], contexts: Sequence[List[int]]) -> List[Optional[Proposal]]:
        return [self._one(s.id, ctx, k) if k > 0 else None for s, ctx, k in zip(rows, contexts, limits)]

    def _one(self, rid: int, ctx: List[int], k: int) -> Optional[Proposal]:
        where, done = self._index.get(rid, ({}, 0))
        for i in range(done, len(ctx) - 1):  # positions of every token but the last
            where.setdefault(ctx[i], []).append(i)
        self._index[rid] = (where, len(ctx) - 1)
        last = len(ctx) - 1
        candidates = where.get(ctx[last], ())
        for n in range(min(NGRAM_MAX, last + 1), 0, -1):
            best = None  # the most recent match with k tokens after it, else the one with the most
            for i in reversed(candidates):
                if i - n + 1 >= 0 and ctx[i - n + 1:i + 1] == ctx[last - n + 1:]:
                    if best is None or min(k, last - i) > last - best:
                        best = i
                    if last - best >= k:
                        break
            if best is not None:
                return Proposal(ctx[best + 1:best + 1 + k])
        return None

    def forget(self, rid: int) -> None:
        self._index.pop(rid, None)


@dataclass
class _DraftRow:
    row: int
    valid: int = 0  # leading context positions whose keys the draft holds
    tail: List[int] = field(default_factory=list)  # tokens it ran after them, last round's proposals


class DraftProposer:
    """A second Transformer of the same vocabulary that decodes ahead."""

    def __init__(self, draft, target):
        check_draft(draft, target)
        self.model = draft
        self._rows: Dict[int, _DraftRow] = {}
        self._free = list(range(draft.params.max_batch_size))[::-1]
        self._generators: Dict[int, torch.Generator] = {}

    def forget(self, rid: int) -> None:
        state = self._rows.pop(rid, None)
        if state is not None:
            self._free.append(state.row)
        self._generators.pop(rid, None)

    def _state(self, seq, live) -> _DraftRow:
        state = self._rows.get(seq.id)
        if state is None:
            if not self._free:  # rows of requests that ended without a word: take them back
                for rid in [r for r in self._rows if r not in live]:
                    self.forget(rid)
            state = self._rows[seq.id] = _DraftRow(self._free.pop())
        return state

    def propose(self, rows, limits: Sequence[int], contexts: Sequence[List[int]]) -> List[Optional[Proposal]]:
        live = {s.id for s in rows}
        chosen = [i for i, k in enumerate(limits) if k > 0]
        out: List[Optional[Proposal]] = [None] * len(rows)
        if not chosen:
            return out
        states, prompts, starts = [], [], []
        for i in chosen:
            state, ctx = self._state(rows[i], live), contexts[i]
            # The keys of last round's proposals stay valid as far as the target accepted them.
            agree = 0
            for a, b in zip(state.tail, ctx[state.valid:-1]):
                if a != b:
                    break
                agree += 1
            state.valid = min(state.valid + agree, len(ctx) - 1)
            state.tail = []
            states.append(state)
            prompts.append(list(ctx))
            starts.append(state.valid)
        k = max(limits[i] for i in chosen)
        drafted: List[List[int]] = [[] for _ in chosen]
        dists: List[List[torch.Tensor]] = [[] for _ in chosen]
        rows_idx = [s.row for s in states]
        for step in range(k):
            logits = self.model.prefill(prompts, rows_idx, starts=starts)  # per row (1, vocab)
            for j, i in enumerate(chosen):
                seq = rows[i]
                params = seq.request.params
                context = torch.tensor(prompts[j], dtype=torch.long, device=logits[j].device)
                generated = context[len(seq.request.prompt_tokens):]
                if params.argmax_only:
                    token, q = int(torch.argmax(logits[j][0])), None
                else:
                    probs = row_probs(logits[j][0], params, context, generated)
                    if params.greedy:
                        token, q = int(torch.argmax(probs)), None
                    else:
                        token = int(torch.multinomial(probs, 1, generator=self._generator(seq, probs.device)))
                        q = probs
                drafted[j].append(token)
                if q is not None:
                    dists[j].append(q)
                starts[j] = len(prompts[j])
                prompts[j] = prompts[j] + [token]
        for j, i in enumerate(chosen):
            state = states[j]
            state.valid = len(contexts[i])  # the context's keys are all in place now
            state.tail = drafted[j][:-1]  # the last proposal was never run
            n = limits[i]
            out[i] = Proposal(drafted[j][:n], torch.stack(dists[j][:n]) if dists[j] else None)
        return out

    def _generator(self, seq, device) -> torch.Generator:
        g = self._generators.get(seq.id)
        if g is None:  # the draft's own draws: the request's generator stays the target's
            g = self._generators[seq.id] = torch.Generator(device=device).manual_seed((seq.seed + 1) % 2**63)
        return g


class Speculator:
    """What the engine asks: proposals per running row, and the verdict on them.

    `tokens`: k, the most tokens proposed per row and step. A request pauses
    its proposals after a window of `probation` proposed tokens of which it
    accepted fewer than `min_acceptance` (see Adaptive above).
    """

    def __init__(self, proposer, tokens: int = 4, min_acceptance: float = 0.3, probation: int = 4):
        check_tokens(tokens)
        if not 0.0 <= min_acceptance <= 1.0:
            raise ValueError(f"min_acceptance must be in [0, 1], got {min_acceptance!r}")
        check_single_process()
        self.proposer = proposer
        self.tokens = tokens
        self.min_acceptance = min_acceptance
        self.probation = probation
        self._stats: Dict[int, _Stats] = {}
        self.proposed = 0  # over all requests
        self.accepted = 0

    @classmethod
    def ngram(cls, tokens: int = 4, **kw) -> "Speculator":
        return cls(NgramProposer(), tokens, **kw)

    @classmethod
    def draft(cls, draft_model, target_model, tokens: int = 4, **kw) -> "Speculator":
        return cls(DraftProposer(draft_model, target_model), tokens, **kw)

    def propose(self, rows, limits: Sequence[int]) -> List[Optional[Proposal]]:
        """Per row (engine sequences), a Proposal of at most its limit tokens, or None."""
        limits = [0 if self._paused(s.id) else min(k, self.tokens) for s, k in zip(rows, limits)]
        contexts = [list(s.request.prompt_tokens) + s.tokens for s in rows]
        return self.proposer.propose(rows, limits, contexts)

    def verify(self, seq, logits: torch.Tensor, proposal: Optional[Proposal], generator,
               history: Tuple[torch.Tensor, torch.Tensor]) -> List[int]:
        """The tokens `seq` emits this step: the accepted proposals and one
        more (a correction or the bonus token). `logits` (k + 1, vocab): the
        verification pass's raw logits at the row's last token and each
        proposal; `history`: the request's (context, generated) for the penalties."""
        params: SamplingParams = seq.request.params
        proposed = proposal.tokens if proposal is not None else []
        out: List[int] = []
        if params.argmax_only:  # the arg-max of the raw logits: compare all at once
            best = torch.argmax(logits[:len(proposed) + 1], dim=-1).tolist()
            for x, b in zip(proposed, best):
                if x != b:
                    break
                out.append(x)
            out.append(best[len(out)])
        else:
            context, generated = history
            device = logits.device
            for j, x in enumerate(proposed):
                run = torch.tensor(out, dtype=torch.long, device=device)
                ctx = torch.cat([context.to(device), run]) if params.has_penalties else context
                gen = torch.cat([generated.to(device), run]) if params.has_penalties else generated
                p = row_probs(logits[j], params, ctx, gen)
                ok, replacement = accept_token(p, x, None if proposal.q is None else proposal.q[j], generator)
                if not ok:
                    out.append(replacement)
                    break
                out.append(x)
            else:  # every proposal accepted: one more token from p, drawn as plain decoding draws it
                run = torch.tensor(out, dtype=torch.long, device=device)
                ctx, gen = context, generated
                if params.has_penalties:
                    ctx, gen = torch.cat([context.to(device), run]), torch.cat([generated.to(device), run])
                state = RowState(params, generator, ctx, gen)
                out.append(int(sample_rows(logits[len(out):len(out) + 1], [state])[0]))
        self._record(seq.id, len(proposed), min(len(out) - 1, len(proposed)) if proposed else 0)
        return out

    def _record(self, rid: int, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        st = self._stats.setdefault(rid, _Stats())
        st.proposed += proposed
        st.accepted += accepted
        st.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        st.window_proposed += proposed
        st.window_accepted += accepted
        if st.window_proposed >= self.probation:  # judge the window, start the next
            if st.window_accepted < self.min_acceptance * st.window_proposed:
                st.paused, st.pause = st.pause, min(2 * st.pause, MAX_PAUSE_STEPS)
            else:
                st.pause = PAUSE_STEPS
            st.window_proposed = st.window_accepted = 0

    def _paused(self, rid: int) -> bool:
        """Whether request `rid` proposes nothing this step (counts down its pause)."""
        st = self._stats.setdefault(rid, _Stats())
        if st.paused:
            st.paused -= 1
            return True
        return False

    def finish(self, rid: int) -> Tuple[int, int]:
        """Forgets request `rid`; returns its (proposed, accepted) tokens."""
        self.proposer.forget(rid)
        st = self._stats.pop(rid, None)
        return (st.proposed, st.accepted) if st is not None else (0, 0)
