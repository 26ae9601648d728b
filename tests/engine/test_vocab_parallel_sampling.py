"""Sampling from logits split by vocabulary across ranks, from each rank's
best candidates (vocab_parallel.local_candidates / plan_from_candidates), checked
here on one process by splitting fake logits in two: the same token and the
same generator state as sampling from the full logits, and None (gather the
full logits) where the candidates cannot decide."""

import pytest
import torch

from llama.engine.sampling import RowState, SamplingParams, sample_rows
from llama.engine.vocab_parallel import CANDIDATES, draw_planned, local_candidates, plan_from_candidates

VOCAB = 4000


def split_plan(logits, row, world=2):
    """What every rank computes from the exchanged candidates of `logits` (vocab,)."""
    n = logits.shape[-1] // world
    k = max(CANDIDATES, row.params.top_k if not row.params.greedy else 0)
    every = torch.stack([local_candidates(logits[r * n:(r + 1) * n], row, r * n, k) for r in range(world)])
    return plan_from_candidates(every, row.params, logits.shape[-1]), every


def row_state(params, seed, context=(), generated=()):
    g = None if params.greedy else torch.Generator().manual_seed(seed)
    return RowState(params, g, torch.tensor(context, dtype=torch.long), torch.tensor(generated, dtype=torch.long))


SETTINGS = [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_p=0.8, top_k=20),  # top_k: the full path's draw, bit for bit
    dict(temperature=1.0, top_p=1.0, top_k=40),
    dict(temperature=1.3, top_p=1.0, min_p=0.05),
    dict(temperature=0.8, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
    dict(temperature=0, repetition_penalty=2.0),  # greedy with penalties
    dict(temperature=1e-45, top_p=0.9),  # below sampling.GREEDY_BELOW: greedy, no generator
    dict(temperature=1e-300, repetition_penalty=1.3),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_same_token_and_generator_state_as_the_full_logits(settings):
    params = SamplingParams(**settings)
    decided = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(1000 + seed)
        logits = torch.randn(VOCAB, generator=g) * 4  # peaked, as a trained model's next token usually is
        history = torch.randint(0, VOCAB, (30,), generator=g).tolist()
        full, split = row_state(params, seed, history, history[-10:]), row_state(params, seed, history, history[-10:])
        plan, _ = split_plan(logits, split)
        if plan is None:
            continue
        decided += 1
        expected = sample_rows(logits[None], [full]).item()
        assert draw_planned(plan, params, split.generator) == expected
        if not params.greedy:
            assert torch.equal(full.generator.get_state(), split.generator.get_state())
    assert decided >= 30  # the candidates decide most rows of a peaked distribution


def test_a_flat_distribution_with_top_p_near_one_needs_the_full_logits():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 0.01
    plan, _ = split_plan(logits, row_state(SamplingParams(temperature=1.0, top_p=0.999), 0))
    assert plan is None
    # the same logits with top_k within the candidates: decided exactly
    plan, _ = split_plan(logits, row_state(SamplingParams(temperature=1.0, top_p=0.999, top_k=50), 0))
    assert plan is not None and len(plan[0]) == 50


def test_greedy_ties_go_to_the_lowest_id_across_the_split():
    logits = torch.zeros(VOCAB)
    logits[[VOCAB // 2 + 3, 7]] = 5.0  # a tie: one id on each rank
    plan, _ = split_plan(logits, row_state(SamplingParams(temperature=0, repetition_penalty=1.1), 0, [1], []))
    assert draw_planned(plan, plan and SamplingParams(temperature=0), None) == 7


def test_what_a_rank_sends_is_small():
    row = row_state(SamplingParams(temperature=0.7), 0)
    _, every = split_plan(torch.randn(128256), row)
    per_rank = every[0].numel() * every.element_size()
    assert per_rank == (2 + 2 * CANDIDATES) * 8 == 1040  # bytes a row, against 4 * 128256 / 2 for the slice
