"""The decoding engine: KV-cache slots, a queue, and one step at a time.

`Engine.submit` queues a request and returns its id; each `Engine.step`

1. takes the step's plan: cancelled requests leave their slots and waiting
   requests are admitted into free ones (rank 0 decides; under torchrun the
   other ranks receive its plan, so every rank runs the same steps),
2. decodes one token for every row whose prompt is in its cache, each at its
   own position (with speculative decoding, speculative.py, its accepted
   proposals too, verified in one pass),
3. prefills the next chunk of the prompts being prefilled (the admitted ones
   and those that did not fit earlier steps) in one packed pass, within the
   step's prompt-token budget (`prefill_chunk`; PREFILL_TOKEN_BUDGET while no
   row decodes), and samples the first token of each prompt that is now
   complete (with a prefix cache, prefix_cache.py, only what follows each
   prompt's cached prefix is run),

and returns one `TokenEvent` per new token. A row's last event carries its
`StopReason` and its `Completion`; the stop rule is decided here and nowhere
else.

Chunked prefill: a prompt longer than what is left of a step's budget is
prefilled over several steps, each running its next chunk after the
positions already in its row (Transformer.prefill's `starts`), so a long
prompt joining a running batch costs the running rows a bounded delay per
step instead of a stall for its whole prefill. Only the last chunk's logits
are sampled; a request with `prompt_logprobs` gathers every chunk's logits.
The budget goes to the prefilling rows in row order, then to newcomers (first
come, first served): every chunk but a step's last finishes its prompt, so
between steps at most one prompt is part-prefilled.

Layout invariant: the running rows occupy KV-cache rows 0..n-1, the rows that
decode first (`running[:n_decoding]`, every one with its whole prompt in its
row), then the rows still prefilling. Decoding reads plain slices of the
cache. The rows whose prompts complete in a step are the first prefilling
ones, so they join the decoding region where it ends. A row that leaves is
replaced so the layout holds: a decoding row by the last decoding row, whose
place the last prefilling row takes; a prefilling row by the last row (each
move copies a row's cache once). Moving a prefilling row into a hole among
the decoding rows would have it decoded from a half-written row: wrong
tokens, not an error.

Under torchrun rank 0's plan carries its budget, and the chunks follow from
it and from state every rank has (the rows, the positions in them), so every
rank runs the same chunks. A request cancelled mid-prefill frees its row
(its full blocks kept in the prefix cache).

Lanes (pipeline stages that work at once): with P > 1 pipeline stages
(runner.py) a decoding pass runs its stages one after another, so each stage
would idle (P - 1) / P of the time. With `overlap` (the default where
max_batch_size is a multiple of P) the KV-cache rows are split into P lanes:
the model holds P cache sets of max_batch_size / P rows
(Transformer.setup_caches(sets=P)) and each lane is a group of requests with
its own running rows, rows 0..n-1 of its own set, in the layout above.
`step` then advances one lane per call, round robin, the same lane on every
rank: it selects the lane's cache set, COLLECTS the passes the lane
launched at its previous turn (its prompt chunks' logits first, then its
decoding pass's ids or logits from the last stage) and emits their events
(first tokens, sampling, stops, releases), plans (cancellations of this
lane's rows or of waiting requests; admissions into this lane's free rows
from the shared queue), and LAUNCHES the lane's next passes, its prompt
chunk and its decoding rows, returning without waiting for the stages after
this rank's. So at steady state stage 0 computes lane A's next pass while
stage 1 computes lane B's, across steps: with P lanes busy every stage is,
and prompts submitted together are prefilled the same way, lane A's on
stage 1 while lane B's are on stage 0. A lane alone (one request) waits for
its whole pass at its next turn, the latency of stage-at-a-time decoding;
an idle lane's turn costs only its plan header. Everything that changes a
lane's rows (collecting, releasing, admitting) happens at its own turn,
after its passes are collected, so a pass's rows stay where it was launched.
Request ids, the waiting queue, the metrics and the prefix cache (its blocks
are copies) are shared by the lanes; a lane's prompt-token budget is the
chunk while any lane decodes (its chunk takes every stage's time, so it
lengthens every lane's round), else PREFILL_TOKEN_BUDGET, as for one lane:
a lane's prompts still in flight are not yet decoding, so lanes that admit
at once all get the larger budget. The plan
header goes point to point from rank 0 (ModelRunner.send_plan, receives
posted ahead), so planning never waits for a stage busy on another lane;
the admissions' payload and agreement stay collectives (steps that admit
only). A request's tokens do not depend on its lane or on the other rows,
so they are those of one process, greedy or seeded.

`self.running` is the current lane's rows (all rows without lanes). An
`Engine(overlap=True)` whose max_batch_size is not a multiple of the stages
is refused; `overlap=None` (the default) then runs the stages one at a time.
Speculative decoding is not combined with lanes.
"""

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..parallel.collectives import broadcast_from_first
from ..text.messages import StopReason
from .metrics import RequestMetrics
from .prefix_cache import PrefixCache, capacity_for
from .runner import ModelRunner, PendingDecode, PendingPrefill
from .sampling import RowState, SamplingParams, row_generator, sample_rows, token_logprobs
from ..text.stream import StopStrings, TextStream

# Prompt tokens prefilled per step while rows decode (the default of Engine's
# prefill_chunk): a longer prompt, or several that do not fit together, is
# prefilled in chunks over several steps, each also decoding the running rows.
# It bounds how long the running rows wait for newcomers: on CPU a step with a
# chunk costs about 2-3x a decoding step of a full batch (docs/engine.md; a
# chunk's pass reads the weights once, so smaller chunks are no cheaper, and
# a larger one costs more where it attends to a long prompt's cached keys).
PREFILL_CHUNK = 32
# Prompt tokens prefilled per step while no row decodes (no stream to hold
# up): a batch of prompts submitted together is prefilled in one pass. It
# bounds the attention mask of a pass (tokens x keys booleans).
PREFILL_TOKEN_BUDGET = 2048


@dataclass(frozen=True)
class Request:
    """One prompt to continue.

    Attributes:
        prompt_tokens: Token ids, bos included if wanted.
        params: How to sample; `params.max_tokens` None means until the context is full.
        prompt_logprobs: Also compute the log-probability of every prompt
            token after the first (Meta's echo with logprobs).
    """

    prompt_tokens: Tuple[int, ...]
    params: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompt_tokens", tuple(self.prompt_tokens))


@dataclass
class Completion:
    """What one request produced, on its last event."""

    prompt_tokens: List[int]
    tokens: List[int]  # generated, without a final stop token
    text: str  # the streamed text: cut before a stop string, if one ended the answer
    stop_reason: StopReason
    logprobs: Optional[List[float]]  # one per token in `tokens`, if asked
    top_logprobs: Optional[List[List[Tuple[int, float]]]]
    prompt_logprobs: Optional[List[float]]  # one per prompt token (the first is 0.0), if asked
    metrics: RequestMetrics


@dataclass
class TokenEvent:
    """One newly decoded token of one request.

    `row` is the request's id for the engine and the prompt's index in the
    batch for `Llama.generate_stream`. `token` is None only on a last event
    that carries no token (a request cancelled, or one with max_tokens 0).
    On a stop token, `token` is that stop token and `text` only what was held
    back, if anything. Joining a request's texts gives its `Completion.text`.
    """

    row: int
    token: Optional[int]
    text: str  # text this token adds; "" while a multi-byte character or a possible stop string is incomplete
    logprob: Optional[float] = None
    stop_reason: Optional[StopReason] = None  # set on the request's last event only
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    completion: Optional[Completion] = None  # on the last event only


@dataclass(eq=False)  # compared by identity
class _Sequence:
    """A request in the engine: waiting, running in a cache row, or finished."""

    id: int
    request: Request
    submitted: float
    seed: int
    admitted: Optional[float] = None
    first_token: Optional[float] = None
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: Optional[List[float]] = None
    texts: List[str] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    stream: Optional[TextStream] = None
    stops: Optional[StopStrings] = None
    cached: int = 0  # positions written to its KV-cache row
    reused: int = 0  # leading prompt tokens copied from the prefix cache at admission (rank 0 decides)
    prefix: List[torch.Tensor] = field(default_factory=list)  # their blocks, taken at planning, written at admission

    @property
    def prefilled(self) -> bool:
        """Its whole prompt is in its row: it decodes (else it is being prefilled)."""
        return self.cached >= len(self.request.prompt_tokens)

    @property
    def next_pos(self) -> int:
        """Position of the last sampled token, which the next decode step feeds."""
        return len(self.request.prompt_tokens) + len(self.tokens) - 1


@dataclass(eq=False)
class _Lane:
    """A group of running requests in one KV-cache set (see Lanes above)."""

    index: int
    running: List[_Sequence] = field(default_factory=list)
    # The decoding pass launched at the lane's last turn: its rows and the runner's handle.
    pending: Optional[Tuple[List[_Sequence], PendingDecode]] = None
    # The prefill pass launched then: its chunks (seq, row, start, end) and the runner's handle.
    prefilling: Optional[Tuple[list, PendingPrefill]] = None


class Engine:
    """Continuous batching over a model's KV cache (`max_batch_size` rows).

    Not thread-safe: one caller submits and steps (a server runs it in one
    thread). Under torchrun every rank must call `step` the same number of
    times; rank 0's queue and cancellations decide what each step does.
    `overlap` (pipeline stages only): None runs one lane per stage where
    max_batch_size is a multiple of the stages, True insists (ValueError
    otherwise), False runs the stages one at a time (see Lanes above).
    """

    def __init__(self, model, tokenizer, prefill_chunk: int = PREFILL_CHUNK, prefix_cache_bytes: int = 0,
                 overlap: Optional[bool] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.params = model.params
        self.set_prefill_chunk(prefill_chunk)  # sets self.prefill_chunk
        self._step_chunk = self.prefill_chunk  # rank 0's prefill_chunk at this step (under torchrun)
        self._step_budget = self.prefill_chunk  # prompt tokens this step prefills (_plan sets it)
        self.device = model.norm.weight.device
        self.waiting: Deque[_Sequence] = deque()
        self.running: List[_Sequence] = []  # running[i] owns KV-cache row i
        self._sequences: Dict[int, _Sequence] = {}  # waiting or running
        self._next_id = 0
        self._cancelled: List[int] = []  # rank 0 of several: sent to all ranks at the next step
        self._ended: List[_Sequence] = []  # cancelled, waiting for their last event
        self._stopping = False  # rank 0: the next step tells the other ranks to stop following
        self.stopped = False  # a following rank: rank 0 said stop
        self._stop_now = False  # ... in this step's plan
        self.passes = ModelRunner(model)  # the model's passes; with pipeline stages, their results on every rank
        group = _all_ranks_group()
        self._group = group
        self._world = dist.get_world_size(group) if group is not None else 1
        self._leader = self._world == 1 or dist.get_rank(group) == 0
        self.prefix_cache: Optional[PrefixCache] = None
        self.prefilled_tokens = 0  # prompt tokens run through the model (not copied from the prefix cache)
        self.set_prefix_cache(prefix_cache_bytes)
        self.speculator = None  # speculative.Speculator: set_speculation
        self._lanes = [_Lane(0, self.running)]
        self._turn = 0  # the lane the next step advances
        self._lane_rows = self.max_batch_size
        self._set_lanes(overlap)

    def _set_lanes(self, overlap: Optional[bool]) -> None:
        """One lane per pipeline stage where `overlap` (see Lanes above)."""
        if overlap not in (None, True, False):
            raise ValueError(f"overlap must be true, false or unset (None), got {overlap!r}")
        stages = self.passes.stages
        lanes = stages if overlap is not False and stages > 1 else 1
        if lanes > 1 and self.max_batch_size % lanes:
            if overlap:
                raise ValueError(f"overlap splits the KV-cache rows into one lane per pipeline stage, but "
                                 f"max_batch_size={self.max_batch_size} is not a multiple of the {stages} stages: "
                                 f"give a max_batch_size that is (e.g. {stages * -(-self.max_batch_size // stages)}), "
                                 "or turn overlap off")
            lanes = 1
        if lanes != max(1, getattr(self.model, "cache_sets", 1)):
            k = self.model.layers[0].attention.cache_k
            self.model.setup_caches(k.device, k.dtype, sets=lanes)
        self._lanes = [self._lanes[0]] + [_Lane(i) for i in range(1, lanes)]
        self._lane_rows = self.max_batch_size // lanes

    def set_overlap(self, overlap: Optional[bool]) -> None:
        """Lanes on (True, or None: where max_batch_size allows) or off (False:
        the stages run one at a time), between steps while no request is in
        the engine. Under torchrun every rank must set the same. ValueError
        while requests are queued or running, or as `Engine(overlap=...)`."""
        if self.has_work():
            raise ValueError("set_overlap changes how the KV-cache rows are split: call it while no request is "
                             "queued or running")
        self._set_lanes(overlap)
        self._turn = 0
        self.running = self._lanes[0].running
        if self.lanes > 1:
            self.model.select_cache(0)

    @property
    def lanes(self) -> int:
        """How many lanes the rows are split into (1: the stages run one at a time)."""
        return len(self._lanes)

    # -- the public interface ---------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.params.max_batch_size

    @property
    def stop_tokens(self):
        return self.tokenizer.stop_tokens

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.n_running

    @property
    def n_running(self) -> int:
        """Requests in KV-cache rows, in every lane (`running` is the current lane's)."""
        return sum(len(lane.running) for lane in self._lanes)

    def set_prefix_cache(self, budget_bytes: int) -> None:
        """Keeps KV-cache blocks of earlier requests in `budget_bytes` (of the
        whole model's cache; each rank holds its share), for requests that start
        with the same tokens (prefix_cache.py); 0 turns it off. Under torchrun
        every rank must set the same budget, between the same steps.
        ValueError for a budget that is not a whole number or holds no block."""
        capacity = capacity_for(budget_bytes, self.params, self.model.norm.weight.element_size())
        self.prefix_cache = PrefixCache(capacity) if capacity else None

    def set_speculation(self, speculator) -> None:
        """Decodes with speculative decoding (speculative.py: `Speculator.ngram(k)`
        or `Speculator.draft(draft_model, model, k)`); None turns it off. Call
        between steps; one process only."""
        if speculator is not None:
            from .speculative import check_single_process

            check_single_process()
            if self.passes.stages > 1:
                raise ValueError("speculative decoding does not run with pipeline stages")
        self.speculator = speculator

    def set_prefill_chunk(self, tokens: int) -> None:
        """Prefills at most `tokens` prompt tokens per step (a longer prompt
        over several steps, the running rows decoding at each). Smaller keeps
        the running streams' steps short while a long prompt joins; larger
        prefills it in fewer, longer steps. Under torchrun rank 0's setting is
        the one every rank runs. ValueError unless a positive whole number."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"prefill_chunk must be a positive whole number of prompt tokens per step, got {tokens!r}")
        self.prefill_chunk = tokens

    @property
    def n_decoding(self) -> int:
        """Rows that decode: running[:n_decoding]; the rest are being prefilled."""
        return sum(s.prefilled for s in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self._cancelled or self._ended
                    or any(lane.running or lane.pending or lane.prefilling for lane in self._lanes))

    def submit(self, request: Request) -> int:
        """Queues `request`; returns its id. Raises ValueError for a prompt that cannot run."""
        if not isinstance(request, Request):
            raise TypeError(f"submit takes a llama.engine.engine.Request, got {type(request).__name__}")
        self.check_prompt(request.prompt_tokens)
        seed = request.params.seed
        if seed is None:  # from torch's global generator: torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**62, (1,)).item())
        seq = _Sequence(self._next_id, request, time.perf_counter(), seed)
        self._next_id += 1
        self._sequences[seq.id] = seq
        self.waiting.append(seq)
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Ends a waiting or running request; its slot is free for the next step.

        Its last event (token None, StopReason.CANCELLED) comes from the next
        `step`. With one process the slot is freed at once; under torchrun
        rank 0's cancellations are applied on every rank at the next step, and
        the other ranks' calls are ignored (they follow rank 0).
        """
        if request_id not in self._sequences or not self._leader:
            return
        if self._world == 1:
            self._ended += self._remove([request_id])
        elif request_id not in self._cancelled:
            self._cancelled.append(request_id)

    def shutdown(self) -> None:
        """Rank 0: the next `step` tells the ranks in `follow` to return."""
        self._stopping = True

    def follow(self) -> None:
        """The loop of a rank other than 0 while rank 0 takes requests from
        elsewhere (a server): runs each step rank 0 runs, until its `shutdown`.
        Rank 0 must call `step` at least every LLAMA_DIST_TIMEOUT seconds, idle
        or not (an idle step costs one small broadcast)."""
        if self._leader:
            raise RuntimeError("follow() is for the ranks other than rank 0, which lead")
        while not self.stopped:
            self.step()

    def step(self) -> List[TokenEvent]:
        """Runs one decoding step; returns the events it produced (possibly none)."""
        if self._stopping:  # rank 0 after shutdown(): release the followers, run nothing
            self._stopping = False
            if self._world > 1:
                self._broadcast_plan([], [], stop=True)
                self._drain_lanes()
            return []
        if len(self._lanes) > 1:
            return self._lane_step()
        admitted = self._plan()
        ended, self._ended = self._ended, []
        events = [self._finish_event(seq, StopReason.CANCELLED) for seq in ended]
        events += self._decode()
        events += self._prefill(admitted)
        return events

    def _lane_step(self) -> List[TokenEvent]:
        """One lane's turn (see Lanes above): collect its last pass, plan,
        prefill its chunk, launch its next pass."""
        lane = self._lanes[self._turn]
        self._turn = (self._turn + 1) % len(self._lanes)
        self.running = lane.running
        self.model.select_cache(lane.index)
        events = self._collect(lane)
        self._stop_now = False
        admitted = self._plan()
        if self._stop_now:  # a follower told to stop: the other lanes' passes end here too
            self._turn = lane.index  # as on rank 0, whose stopping step advances no lane
            self._drain_lanes()
            return events
        ended, self._ended = self._ended, []
        events += [self._finish_event(seq, StopReason.CANCELLED) for seq in ended]
        events += self._admit(admitted)
        chunks = self._chunks()
        if chunks:
            lane.prefilling = (chunks, self.passes.launch_prefill(*self._prefill_args(chunks)))
        self._launch(lane)
        return events

    def _drain_lanes(self) -> None:
        """Takes (and drops) every lane's pass in flight, so no message is left
        unreceived when the ranks stop following."""
        for lane in self._lanes:
            if lane.prefilling is not None:
                self.passes.collect_prefill(lane.prefilling[1])
                lane.prefilling = None
            if lane.pending is not None:
                self.passes.collect(lane.pending[1])
                lane.pending = None
        self.passes.drain()

    # -- scheduling -------------------------------------------------------

    def _plan(self) -> List[_Sequence]:
        """Applies this step's cancellations and returns the sequences to admit,
        the same on every rank: rank 0 decides and sends its plan to the others."""
        if not self._leader:
            cancelled, admitted = self._receive_plan()
            self._ended += self._remove(cancelled)
            self._set_step_budget()
        else:
            cancelled, self._cancelled = self._cancelled, []
            if len(self._lanes) > 1:  # a row of another lane leaves at that lane's turn
                later = [rid for rid in cancelled if self._in_other_lane(rid)]
                cancelled, self._cancelled = [rid for rid in cancelled if rid not in later], later
            self._ended += self._remove(cancelled)
            self._step_chunk = self.prefill_chunk
            self._set_step_budget()
            admitted = self._choose_admissions()
            if self._world > 1:
                self._broadcast_plan(cancelled, admitted)
        for seq in admitted:  # every rank, in rank 0's order: the same blocks touched everywhere
            if seq.reused and self.prefix_cache is None:
                raise RuntimeError("rank 0 reuses a cached prefix but this rank has no prefix cache: every rank "
                                   "must set the same prefix cache budget (Engine.set_prefix_cache)")
            seq.prefix = self.prefix_cache.take(seq.request.prompt_tokens, seq.reused) if seq.reused else []
        return admitted

    def _in_other_lane(self, rid: int) -> bool:
        seq = self._sequences.get(rid)
        return seq is not None and any(seq in lane.running for lane in self._lanes if lane.running is not self.running)

    def _set_step_budget(self) -> None:
        """This step's prompt-token budget, from rank 0's chunk and the rows every
        rank holds: the chunk while rows decode (in any lane: a lane's chunk
        lengthens every lane's round), else at least PREFILL_TOKEN_BUDGET."""
        idle = not any(s.prefilled for lane in self._lanes for s in lane.running)
        self._step_budget = max(self._step_chunk, PREFILL_TOKEN_BUDGET) if idle else self._step_chunk

    def _choose_admissions(self) -> List[_Sequence]:
        """First come, first served, into free rows, while the step's prompt-token
        budget lasts after the rows still being prefilled (which go first). The
        budget counts the tokens after each prompt's cached prefix; the last
        one admitted may take only a chunk of its prompt this step."""
        budget = self._step_budget - sum(len(s.request.prompt_tokens) - s.cached for s in self.running[self.n_decoding:])
        admitted, free = [], self._lane_rows - len(self.running)
        for seq in self.waiting:
            if len(admitted) == free or budget <= 0:
                break
            # prompt_logprobs need every position's logits: those prompts run whole.
            cached = self.prefix_cache is not None and not seq.request.prompt_logprobs
            reused = self.prefix_cache.match(seq.request.prompt_tokens) if cached else 0
            seq.reused = reused
            admitted.append(seq)
            budget -= len(seq.request.prompt_tokens) - reused
        return admitted

    def _broadcast_plan(self, cancelled: List[int], admitted: List[_Sequence], stop: bool = False) -> None:
        header = torch.tensor([len(cancelled), len(admitted), stop, self._step_chunk], dtype=torch.long,
                              device=self._comm_device())
        if len(self._lanes) > 1:
            self.passes.send_plan(header)
        else:
            broadcast_from_first(header, self._group)
        if cancelled or admitted:
            payload = [(cancelled, [(s.id, s.request, s.seed, s.reused) for s in admitted])]
            dist.broadcast_object_list(payload, src=dist.get_global_rank(self._group, 0), group=self._group)
            if admitted:
                self._agree(None)

    def _receive_plan(self) -> Tuple[List[int], List[_Sequence]]:
        if len(self._lanes) > 1:
            header = self.passes.receive_plan((4,), torch.long, self._comm_device())
        else:
            header = broadcast_from_first(torch.zeros(4, dtype=torch.long, device=self._comm_device()), self._group)
        n_cancelled, n_admitted, stop, self._step_chunk = header.tolist()
        if stop:
            self.stopped = self._stop_now = True
            return [], []
        if not n_cancelled + n_admitted:
            return [], []
        payload = [None]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(self._group, 0), group=self._group)
        cancelled, admissions = payload[0]
        admitted, problem = [], None
        for rid, request, seed, reused in admissions:
            local = self._sequences.get(rid)
            if local is None:  # submitted on rank 0 only (a server): follow it
                local = _Sequence(rid, request, time.perf_counter(), seed)
                self._sequences[rid] = local
                self._next_id = max(self._next_id, rid + 1)
            else:
                problem = problem or _request_difference(rid, local.request, request)
                local.seed = seed
            local.reused = reused
            admitted.append(local)
        if admissions:
            self._agree(problem)
        return cancelled, admitted

    def _agree(self, problem: Optional[str]) -> None:
        """Every rank learns whether any rank was given another request than
        rank 0's (one small exchange per step that admits requests), and then
        every rank stops with the same message, not only the one that differs."""
        said: List[Optional[str]] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(said, problem, group=self._group)
        first = next((p for p in said if p is not None), None)
        if first is not None:
            raise ValueError(first)

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend(self._group) == "nccl" else torch.device("cpu")

    def _remove(self, ids: Sequence[int]) -> List[_Sequence]:
        """Takes the sequences `ids` out of the queue or their cache rows."""
        out = []
        for rid in ids:
            seq = self._sequences.pop(rid, None)
            if seq is None:
                continue
            if seq in self.running:
                self._release(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            out.append(seq)
        return out

    def _release(self, seq: _Sequence) -> None:
        """Frees `seq`'s cache row (its blocks kept in the prefix cache first),
        keeping the layout (decoding rows, then prefilling rows): a decoding
        row's place is taken by the last decoding row and that one's by the last
        prefilling row; a prefilling row's by the last row."""
        row, last = self.running.index(seq), len(self.running) - 1
        self._keep_blocks(seq, row, seq.cached)
        if seq.prefilled:
            end = self.n_decoding - 1  # the last decoding row
            if row != end:
                self._move_row(end, row)
                row = end
        if row != last:
            self._move_row(last, row)
        self.running.pop()

    def _move_row(self, src: int, dst: int) -> None:
        moved = self.running[src]
        self.model.move_cache_row(src, dst, moved.cached)
        self.running[dst] = moved

    def _keep_blocks(self, seq: _Sequence, row: int, n_valid: int) -> None:
        """Copies `seq`'s full blocks among the first `n_valid` positions of
        `row` into the prefix cache (those it holds already are only touched)."""
        if self.prefix_cache is not None and n_valid:
            tokens = seq.request.prompt_tokens + tuple(seq.tokens)
            self.prefix_cache.insert(tokens, n_valid, lambda start, n: self.model.read_cache(row, start, n))

    # -- decoding ---------------------------------------------------------

    def _decode(self) -> List[TokenEvent]:
        """One token for every decoding row (running[:n_decoding]), each at its own position."""
        rows = self.running[:self.n_decoding]
        if not rows:
            return []
        if self.speculator is not None:
            events = self._decode_speculative(rows)
            if events is not None:  # None: no row had proposals this step
                return events
        tokens, start, argmax_only = self._decode_inputs(rows)
        # Logprobs need the full logits. Without them, rows whose token is the
        # raw arg-max need only that, sampled ones each rank's best candidates:
        # the runner exchanges those across tensor-parallel ranks, not the logits.
        states = None
        if not argmax_only and not any(s.request.params.wants_logprobs for s in rows):
            states = lambda: self._row_states(rows)  # noqa: E731
        ids, logits = self.passes.decode(tokens, start, argmax_only=argmax_only, row_states=states)
        return self._emit(rows, ids, None) if logits is None else self._sample_and_emit(rows, logits)

    def _decode_inputs(self, rows: List[_Sequence]) -> Tuple[torch.Tensor, object, bool]:
        """A decoding pass's inputs for `rows`: (their last tokens (rows, 1), the
        position they go to: one int, or a tensor of one per row, whether every
        row's token is the raw logits' arg-max with no logprobs asked). Each row
        counts that position as written (the pass writes it)."""
        tokens = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=self.device)
        positions = [s.next_pos for s in rows]
        start = positions[0] if len(set(positions)) == 1 else torch.tensor(positions, device=self.device)
        for seq, pos in zip(rows, positions):
            seq.cached = pos + 1
        argmax_only = all(s.request.params.argmax_only and not s.request.params.wants_logprobs for s in rows)
        return tokens, start, argmax_only

    def _decode_speculative(self, rows: List[_Sequence]) -> Optional[List[TokenEvent]]:
        """Up to k + 1 tokens for every running row in one pass (speculative.py):
        its last token and the speculator's proposals run at their positions,
        and each row emits the proposals the model accepts plus one token of
        its own. Rows without proposals are padded and emit one token. None
        if no row has a proposal (the plain step runs instead)."""
        positions = [s.next_pos for s in rows]
        room = self.params.max_seq_len - 1 - max(positions)  # the padded pass must fit every row's cache
        limits = []
        for seq in rows:
            p = seq.request.params
            left = p.max_tokens - len(seq.tokens) - 1 if p.max_tokens is not None else room
            limits.append(max(0, min(room, left)))  # proposals past the row's end would be wasted
        proposals = self.speculator.propose(rows, limits)
        if not any(p is not None and p.tokens for p in proposals):
            return None
        k = max(len(p.tokens) for p in proposals if p is not None)
        batch = []
        for seq, prop in zip(rows, proposals):
            ahead = prop.tokens if prop is not None else []
            batch.append([seq.tokens[-1]] + ahead + [seq.tokens[-1]] * (k - len(ahead)))
        tokens = torch.tensor(batch, dtype=torch.long, device=self.device)
        logits = self.model.forward(tokens, torch.tensor(positions, device=self.device))  # (rows, k + 1, vocab)
        outs = [self.speculator.verify(seq, logits[i], proposals[i], seq.generator, self._history(seq))
                for i, seq in enumerate(rows)]
        for seq, pos, out in zip(rows, positions, outs):
            # Valid keys: the last token and the accepted proposals (a later row
            # may move while an earlier one ends below).
            seq.cached = pos + len(out)
        events = []
        now = time.perf_counter()
        for i, (seq, pos, out) in enumerate(zip(rows, positions, outs)):
            if seq.first_token is None:
                seq.first_token = now
            lps = self._run_logprobs(seq, logits[i], out)
            for m, token in enumerate(out):
                # If the request ends here, only positions up to this token's are valid and recorded.
                seq.cached = pos + m + 1
                lp, top = lps[m] if lps else (None, None)
                event = self._advance(seq, token, lp, top)
                events.append(event)
                if event.stop_reason is not None:
                    break  # the rest of the run is dropped
        return events

    def _run_logprobs(self, seq: _Sequence, logits: torch.Tensor, out: List[int]):
        """Per token of `out`, (logprob, top alternatives) from its position's raw logits, or None."""
        p = seq.request.params
        if not p.wants_logprobs:
            return None
        ids = torch.tensor(out, dtype=torch.long, device=logits.device)
        chosen, top = token_logprobs(logits[:len(out)], ids, p.top_logprobs)
        chosen = chosen.tolist()
        if top is None:
            return [(c, None) for c in chosen]
        top_ids, top_lps = top[0].tolist(), top[1].tolist()
        return [(c, list(zip(a, b))) for c, a, b in zip(chosen, top_ids, top_lps)]

    def _launch(self, lane: _Lane) -> None:
        """Starts the decoding pass of the lane's decoding rows (this rank's
        stage of it; `_collect` takes its result at the lane's next turn)."""
        rows = self.running[:self.n_decoding]
        if not rows:
            return
        tokens, start, argmax_only = self._decode_inputs(rows)
        lane.pending = (rows, self.passes.launch_decode(tokens, start, argmax_only))

    def _collect(self, lane: _Lane) -> List[TokenEvent]:
        """The events of the passes the lane launched at its previous turn: the
        prefill first, while its chunks' rows are where they were launched
        (a decoding row that ends may move a prefilling row)."""
        events = []
        if lane.prefilling is not None:
            (chunks, pending), lane.prefilling = lane.prefilling, None
            events += self._prefilled(chunks, self.passes.collect_prefill(pending))
        if lane.pending is not None:
            (rows, pending), lane.pending = lane.pending, None
            ids, logits = self.passes.collect(pending)
            events += self._emit(rows, ids, None) if logits is None else self._sample_and_emit(rows, logits)
        return events

    def _prefill(self, admitted: List[_Sequence]) -> List[TokenEvent]:
        """Puts the admitted requests into rows after the running ones, runs this
        step's chunks of the prompts being prefilled in one pass, and samples
        the first token of each prompt it completes."""
        events = self._admit(admitted)
        chunks = self._chunks()
        if chunks:
            events += self._prefilled(chunks, self.passes.prefill(*self._prefill_args(chunks)))
        return events

    def _admit(self, admitted: List[_Sequence]) -> List[TokenEvent]:
        """Puts the admitted requests into rows after the running ones, with
        their cached prefixes written; a request for no token ends here."""
        events, joining = [], []
        for seq in admitted:
            if seq in self.waiting:
                self.waiting.remove(seq)
            seq.admitted = time.perf_counter()
            seq.stream, seq.stops = TextStream(self.tokenizer), StopStrings(seq.request.params.stop)
            seq.generator = row_generator(seq.request.params, seq.seed, self.device)
            if seq.request.params.max_tokens == 0 and not seq.request.prompt_logprobs:
                events.append(self._finish_event(seq, StopReason.OUT_OF_TOKENS))
            else:
                joining.append(seq)
        first_row = len(self.running)
        self.running.extend(joining)
        for row, seq in enumerate(joining, first_row):
            for i, block in enumerate(seq.prefix):
                self.model.write_cache(row, i * block.shape[-2], block)
            seq.cached = sum(b.shape[-2] for b in seq.prefix)
            seq.prefix = []
            if seq.request.prompt_logprobs:
                seq.prompt_logprobs = [0.0]  # the first prompt token has no logits before it
        return events

    def _chunks(self) -> list:
        """This step's chunks (seq, row, start, end): the prefilling rows in row
        order, each its whole rest while the budget lasts (so only the last
        chunk may stop short)."""
        chunks, budget = [], self._step_budget
        for row in range(self.n_decoding, len(self.running)):
            if budget <= 0:
                break
            seq = self.running[row]
            n = min(len(seq.request.prompt_tokens) - seq.cached, budget)
            chunks.append((seq, row, seq.cached, seq.cached + n))
            budget -= n
        self.prefilled_tokens += sum(end - start for _, _, start, end in chunks)
        return chunks

    @staticmethod
    def _prefill_args(chunks: list) -> tuple:
        """The runner's prefill arguments for `chunks`: prompts, rows, all_logits, starts."""
        return ([s.request.prompt_tokens[:end] for s, _, _, end in chunks], [row for _, row, _, _ in chunks],
                [s.request.prompt_logprobs for s, _, _, _ in chunks], [start for _, _, start, _ in chunks])

    def _prefilled(self, chunks: list, outs: List[torch.Tensor]) -> List[TokenEvent]:
        """Records the chunks a pass wrote (cached positions, prefix-cache
        blocks, prompt logprobs) and samples the first token of each prompt
        they complete."""
        done, events = [], []
        for (seq, row, start, end), out in zip(chunks, outs):
            seq.cached = end
            self._keep_blocks(seq, row, end)  # for the requests that share this prompt, running or not
            prompt = seq.request.prompt_tokens
            n = min(end, len(prompt) - 1) - start  # the prompt tokens this chunk's logits predict
            if seq.request.prompt_logprobs and n > 0:  # out[j] predicts the token at start + j + 1
                targets = torch.tensor(prompt[start + 1:start + 1 + n], device=out.device)
                seq.prompt_logprobs += token_logprobs(out[:n], targets)[0].tolist()
            if end == len(prompt):  # complete: the first prefilling rows, now the last decoding ones
                done.append((seq, out[-1:]))
        events += [self._finish_event(s, StopReason.OUT_OF_TOKENS) for s, _ in done if s.request.params.max_tokens == 0]
        sampled = [(s, o) for s, o in done if s.request.params.max_tokens != 0]
        if sampled:
            events += self._sample_and_emit([s for s, _ in sampled], torch.cat([o for _, o in sampled]))
        return events

    def _sample(self, rows: List[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next token (rows,) of each row, by its request's sampling parameters."""
        if all(s.request.params.argmax_only for s in rows):
            return torch.argmax(logits, dim=-1)  # the common case needs no per-row state
        return sample_rows(logits, self._row_states(rows))

    def _row_states(self, rows: List[_Sequence]) -> List[RowState]:
        return [RowState(s.request.params, s.generator, *self._history(s)) for s in rows]

    def _sample_and_emit(self, rows: List[_Sequence], logits: torch.Tensor) -> List[TokenEvent]:
        next_tokens = self._sample(rows, logits)
        return self._emit(rows, next_tokens, self._logprobs(rows, logits, next_tokens))

    def _emit(self, rows: List[_Sequence], next_tokens: torch.Tensor, lps) -> List[TokenEvent]:
        now = time.perf_counter()
        events = []
        for i, (seq, token) in enumerate(zip(rows, next_tokens.tolist())):
            if seq.first_token is None:
                seq.first_token = now
            lp, top = lps[i] if lps else (None, None)
            events.append(self._advance(seq, token, lp, top))
        return events

    def _advance(self, seq: _Sequence, token: int, lp, top) -> TokenEvent:
        """Records `token` for `seq` and decides whether the request ends here."""
        p, n_prompt = seq.request.params, len(seq.request.prompt_tokens)
        if token in self.stop_tokens:
            text, _ = seq.stops.feed(seq.stream.flush())
            return self._finish_event(seq, StopReason.for_stop_token(token, self.tokenizer), token, text + seq.stops.flush(),
                                      lp, top)
        seq.tokens.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            if top is not None:
                seq.top_logprobs.append(top)
        n = len(seq.tokens)
        out_of_tokens = (p.max_tokens is not None and n >= p.max_tokens) or n_prompt + n >= self.params.max_seq_len
        piece = seq.stream.add(token) + (seq.stream.flush() if out_of_tokens else "")
        text, found = seq.stops.feed(piece)
        if found:
            return self._finish_event(seq, StopReason.STOP_STRING, token, text, lp, top)
        if out_of_tokens:
            return self._finish_event(seq, StopReason.OUT_OF_TOKENS, token, text + seq.stops.flush(), lp, top)
        seq.texts.append(text)
        return TokenEvent(seq.id, token, text, lp, None, top)

    def _finish_event(self, seq: _Sequence, reason: StopReason, token: Optional[int] = None, text: str = "",
                      lp: Optional[float] = None, top=None) -> TokenEvent:
        """Ends `seq` (its row is freed at once) and returns its last event."""
        if seq in self.running:
            self._release(seq)
        self._sequences.pop(seq.id, None)
        seq.texts.append(text)
        now = time.perf_counter()
        p = seq.request.params
        stopped_on_token = token is not None and token in self.stop_tokens
        n_generated = len(seq.tokens) + stopped_on_token  # the stop token counts as generated
        proposed, accepted = self.speculator.finish(seq.id) if self.speculator is not None else (0, 0)
        completion = Completion(
            prompt_tokens=list(seq.request.prompt_tokens), tokens=list(seq.tokens), text="".join(seq.texts),
            stop_reason=reason, logprobs=list(seq.logprobs) if p.wants_logprobs else None,
            top_logprobs=list(seq.top_logprobs) if p.top_logprobs else None, prompt_logprobs=seq.prompt_logprobs,
            metrics=RequestMetrics.of(seq.submitted, seq.admitted, seq.first_token, now,
                                      len(seq.request.prompt_tokens), n_generated, proposed, accepted),
        )
        return TokenEvent(seq.id, token, text, lp, reason, top, completion)

    def _logprobs(self, rows, logits, next_tokens):
        wanted = [i for i, s in enumerate(rows) if s.request.params.wants_logprobs]
        if not wanted:
            return None
        top_n = max(rows[i].request.params.top_logprobs for i in wanted)
        idx = torch.tensor(wanted, device=logits.device)
        chosen, top = token_logprobs(logits[idx], next_tokens[idx], top_n)
        out = [(None, None)] * len(rows)
        chosen = chosen.tolist()
        top = (top[0].tolist(), top[1].tolist()) if top is not None else None
        for j, i in enumerate(wanted):
            n = rows[i].request.params.top_logprobs
            alternatives = list(zip(top[0][j][:n], top[1][j][:n])) if n else None
            out[i] = (chosen[j], alternatives)
        return out

    def _history(self, seq: _Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prompt + answer ids, answer ids) for the penalties; empty when the request has none."""
        if not seq.request.params.has_penalties:
            return _EMPTY, _EMPTY
        answer = torch.tensor(seq.tokens, dtype=torch.long, device=self.device)
        prompt = torch.tensor(seq.request.prompt_tokens, dtype=torch.long, device=self.device)
        return torch.cat([prompt, answer]), answer

    def check_prompt(self, tokens: Sequence[int], name: str = "the prompt") -> None:
        """Raises ValueError, naming the prompt `name`, if `tokens` cannot run in this model."""
        max_seq_len, vocab = self.params.max_seq_len, self.params.vocab_size
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise ValueError(f"{name} must be a list of token ids, got {type(tokens).__name__}")
        if not tokens:
            raise ValueError(f"{name} is empty: give at least one token")
        bad = next((t for t in tokens if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"{name} has a token id that is not an integer: {bad!r}")
        if len(tokens) >= max_seq_len:
            raise ValueError(
                f"{name} has {len(tokens)} tokens, which leaves no room to generate within "
                f"max_seq_len={max_seq_len}; shorten it or build with a larger max_seq_len"
            )
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"{name} has token ids outside 0..{vocab - 1}")


_EMPTY = torch.zeros(0, dtype=torch.long)


def _all_ranks_group():
    """Every rank runs the engine's steps (all tensor-parallel ranks of every pipeline stage)."""
    return dist.group.WORLD if dist.is_initialized() else None


def _request_difference(rid: int, mine: Request, rank0: Request) -> Optional[str]:
    """Every rank runs rank 0's request; the first field in which this rank was asked something else, described."""
    import socket

    for f in dataclasses.fields(Request):
        a, b = getattr(mine, f.name), getattr(rank0, f.name)
        if a == b:
            continue
        name = f.name
        if f.name == "params":  # name the sampling setting (temperature, max_tokens, seed, ...)
            fields = [g.name for g in dataclasses.fields(a) if getattr(a, g.name) != getattr(b, g.name)]
            name, a, b = f"params.{fields[0]}", getattr(a, fields[0]), getattr(b, fields[0])
        return (f"request {rid} differs between ranks in {name}: rank {dist.get_rank()} on {socket.gethostname()} "
                f"has {a!r:.120}, rank 0 has {b!r:.120}. Every rank must be given the same prompts and sampling "
                "settings (max_tokens is max_gen_len)")
    return None

