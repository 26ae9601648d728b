"""The model runner: the engine's model passes (decode, prefill), with the
same result on every rank, for one stage or for pipeline stages.

One stage: the model itself, tensor-parallel or not. Tensor-parallel
decoding exchanges only what the step needs: each rank's (max, index) when
every row's token is the arg-max of the raw logits
(SamplingParams.argmax_only), each rank's best candidates when the rows
sample (vocab_parallel.py), the full logits only where logprobs are asked.

Pipeline stages: the layers split into P contiguous stages across the
ranks, for nodes joined by a slow link. Tensor parallelism exchanges
activations twice per layer, so a token crosses the link 2L+ times; with one
stage per node it crosses each link once: stage s sends its hidden state
(bs, seq, dim) to stage s + 1 with a point-to-point send, and the last stage
sends what the engine needs back to every rank (the chosen token ids when
every row takes the arg-max, 8 bytes a row; the logits otherwise), so every
rank's engine runs the same steps. A decoding step costs P one-way trips:
receives of decoding's shapes are posted ahead (as in
llama/parallel/collectives.py), since gloo sends a payload only once the
receiver has posted its receive.

Ranks: world = P x T, rank = stage x T + t (fairscale's layout), so a
stage's T tensor-parallel ranks are consecutive ranks, one node under
torchrun. Rank t of a stage talks to rank t of the next (fairscale's
pipeline group): each holds the whole hidden state after its layers.

One decoding pass runs its stages one after another. To keep every stage
busy, the engine splits its rows into P lanes (llama/engine/engine.py) and
runs a decoding pass in two halves: `launch_decode` does this rank's part
(stage 0: its layers, then the hidden state sent on; a later stage: receive,
its layers, send on; the last: the ids or logits, sent to every other rank
and kept) and returns at once; `collect` takes the pass's result (the last
stage's kept one, or the one it sent) at the lane's next turn. Between the
two, stage 0 runs another lane while stage 1 runs this one. `decode` is the
two back to back (stage at a time). A lane's prompt chunks go the same way
(`launch_prefill`, `collect_prefill`; `prefill` back to back), so a lane
being prefilled holds up the others only by its stages' compute, never by
a wait for a stage busy on another lane. Each peer pair's messages of one tag
arrive in the order sent, and every rank runs the lanes in the same order,
so the lanes' passes need no tag of their own.

The engine's per-step plan header goes from rank 0 to every rank point to
point (`send_plan`, `receive_plan`, receives posted ahead), not by a
broadcast: a broadcast would hold rank 0 until the last stage had finished
the other lane's pass, which is the wait the lanes are there to remove.
"""

from dataclasses import dataclass

import zlib
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..parallel.collectives import vocab_parallel_argmax
from .vocab_parallel import vocab_parallel_sample

# Receives posted ahead per kind and shape (see llama/parallel/collectives.py): the
# hidden states and results of decoding. A posted receive is never withdrawn,
# so only shapes up to this many elements get them (logits of a few rows).
AHEAD = 2
AHEAD_MAX_ELEMENTS = 1 << 20


def _pipeline_ranks() -> List[int]:
    if not dist.is_initialized():
        return [0]
    from fairscale.nn.model_parallel.initialize import get_pipeline_parallel_ranks, model_parallel_is_initialized

    return get_pipeline_parallel_ranks() if model_parallel_is_initialized() else [dist.get_rank()]


def _model_parallel_size() -> int:
    from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size, model_parallel_is_initialized

    return get_model_parallel_world_size() if dist.is_initialized() and model_parallel_is_initialized() else 1


class ModelRunner:
    """The model passes of the engine's steps (decode, prefill), giving every
    rank the same result whichever stage computed it. One stage: the model
    itself (tensor-parallel or not)."""

    def __init__(self, model):
        self.model = model
        self.ranks = _pipeline_ranks()  # the global rank of each stage's member with this tensor-parallel index
        self.stages = len(self.ranks)
        self.stage = self.ranks.index(dist.get_rank()) if self.stages > 1 else 0
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.group = None
        self.tensor_parallel = _model_parallel_size() > 1
        self.post_ahead = False
        if self.stages > 1:
            from fairscale.nn.model_parallel.initialize import get_pipeline_parallel_group

            self.group = get_pipeline_parallel_group()
            # NCCL runs one peer pair's sends and receives in order on one
            # stream (and ignores tags): a receive posted ahead would hold up
            # this rank's next send to that peer. It needs no ready notice anyway.
            self.post_ahead = dist.get_backend(self.group) == "gloo"
        self._posted: Dict[Tuple, Deque[Tuple[torch.Tensor, object]]] = {}
        self._sends: List[Tuple[object, torch.Tensor]] = []

    def decode(self, tokens: torch.Tensor, start, argmax_only: bool,
               row_states: Optional[Callable[[], list]] = None
               ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One token per row: (ids (rows,), None) if `argmax_only` (the
        engine found every row's token to be the arg-max of its raw logits,
        and no logprobs asked) or if tensor-parallel ranks could sample from
        their candidates (`row_states` gives the rows' sampling.RowState;
        None where the full logits are needed, as for logprobs), else (None,
        float logits (rows, vocab))."""
        if self.stages == 1:
            if self.tensor_parallel and (argmax_only or row_states is not None):
                # Each rank's (max, index) or its best candidates are exchanged, not its slice of the logits.
                local = self.model.forward(tokens, start, last_logits_only=True, gather_logits=False)[:, 0]
                ids = vocab_parallel_argmax(local) if argmax_only else vocab_parallel_sample(local, row_states())
                return ids, None
            return None, self.model.forward(tokens, start, last_logits_only=True)[:, 0]
        return self.collect(self.launch_decode(tokens, start, argmax_only))

    def launch_decode(self, tokens: torch.Tensor, start, argmax_only: bool) -> "PendingDecode":
        """Pipeline stages: this rank's part of a decoding pass (see the module
        docstring), without waiting for the stages after it; `collect` gives
        the pass's (ids, None) if `argmax_only`, else (None, logits)."""
        if self.stages == 1:
            raise RuntimeError("launch_decode is for pipeline stages; one stage decodes with decode()")
        rows = tokens.shape[0]
        x = tokens if self.first else self._receive("decode", (rows, 1, self.model.params.dim), self._dtype, True)
        out = self.model.forward(x, start, last_logits_only=True, gather_logits=not argmax_only)
        if not self.last:
            self._send(out, "decode")
            return PendingDecode(rows, argmax_only, None)
        out = vocab_parallel_argmax(out[:, 0]) if argmax_only else out[:, 0]  # (rows,) or (rows, vocab)
        for peer in self.ranks[:-1]:
            self._send(out, "ids" if argmax_only else "logits", peer)
        return PendingDecode(rows, argmax_only, out)

    def collect(self, pending: "PendingDecode") -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The result of a pass `launch_decode` started, on every rank: (ids, None) or (None, logits)."""
        if pending.argmax_only:
            ids = pending.result if self.last else self._receive("ids", (pending.rows,), torch.long, True,
                                                                 peer=self.ranks[-1])
            return ids, None
        shape = (pending.rows, self.model.params.vocab_size)
        logits = pending.result if self.last else self._receive("logits", shape, torch.float32, True,
                                                                peer=self.ranks[-1])
        return None, logits

    # -- the engine's plan header, rank 0 to every rank -------------------------

    def send_plan(self, header: torch.Tensor) -> None:
        """Rank 0: `header` to every other rank, without waiting for them."""
        header = header.contiguous()
        tag = _tag("plan", header.shape, header.dtype)
        self._sends = [(w, x) for w, x in self._sends if not w.is_completed()]
        for peer in range(1, dist.get_world_size()):
            self._sends.append((dist.isend(header, peer, tag=tag), header))

    def receive_plan(self, shape, dtype, device) -> torch.Tensor:
        """A rank other than 0: rank 0's next `send_plan` header (receives
        posted ahead on gloo; on NCCL a posted receive would hold up the
        world group's collectives, and it needs no ready notice)."""
        tag = _tag("plan", shape, dtype)
        queue = self._posted.setdefault(("plan", tag), deque())
        while len(queue) < (AHEAD + 1 if dist.get_backend() == "gloo" else 1):
            buffer = torch.empty(shape, dtype=dtype, device=device)
            queue.append((buffer, dist.irecv(buffer, 0, tag=tag)))
        buffer, request = queue.popleft()
        request.wait()
        return buffer

    def drain(self) -> None:
        """Waits for this rank's sends (the peers have received them)."""
        for request, _ in self._sends:
            request.wait()
        self._sends = []

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                all_logits: Sequence[bool] = (), starts: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """Transformer.prefill over the stages: per prompt, logits (1, vocab) or
        (len - start, vocab). `starts`: positions each row holds already (a
        cached prefix, which every stage copied into its own layers' rows)."""
        if self.stages == 1:
            return self.model.prefill(prompts, rows, all_logits, starts=starts)
        return self.collect_prefill(self.launch_prefill(prompts, rows, all_logits, starts))

    def launch_prefill(self, prompts: Sequence[Sequence[int]], rows: Sequence[int],
                       all_logits: Sequence[bool] = (), starts: Optional[Sequence[int]] = None) -> "PendingPrefill":
        """Pipeline stages: this rank's part of a prefill pass, as
        `launch_decode` for decoding (the lanes prefill a chunk the way they
        decode: stage 0 goes on with another lane while the later stages run
        this one); `collect_prefill` gives what `prefill` returns."""
        if self.stages == 1:
            raise RuntimeError("launch_prefill is for pipeline stages; one stage prefills with prefill()")
        starts = list(starts) if starts is not None else [0] * len(prompts)
        total = sum(len(p) - s for p, s in zip(prompts, starts))
        hidden = None if self.first else self._receive("prefill", (1, total, self.model.params.dim), self._dtype, False)
        out = self.model.prefill(prompts, rows, all_logits, hidden=hidden, starts=starts)
        want = list(all_logits) + [False] * (len(prompts) - len(all_logits))
        sizes = [len(p) - s if full else 1 for p, s, full in zip(prompts, starts, want)]
        if not self.last:
            self._send(out, "prefill")
            return PendingPrefill(sizes, None)
        logits = torch.cat(out)  # (sum(sizes), vocab), sent to every other stage
        for peer in self.ranks[:-1]:
            self._send(logits, "prefill logits", peer)
        return PendingPrefill(sizes, logits)

    def collect_prefill(self, pending: "PendingPrefill") -> List[torch.Tensor]:
        """The logits of a pass `launch_prefill` started, on every rank: per prompt, as `prefill` gives them."""
        logits = pending.result
        if not self.last:
            shape = (sum(pending.sizes), self.model.params.vocab_size)
            logits = self._receive("prefill logits", shape, torch.float32, False, peer=self.ranks[-1])
        return list(logits.split(pending.sizes))

    # -- point to point -----------------------------------------------------

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype  # the activations' dtype (every weight is loaded in it)

    def _send(self, t: torch.Tensor, kind: str, peer: Optional[int] = None) -> None:
        t = t.contiguous()
        peer = self.ranks[self.stage + 1] if peer is None else peer
        # Waited for later (the receiver has a receive posted, or posts it soon);
        # the tensor is kept alive until then.
        self._sends = [(w, x) for w, x in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(t, peer, self.group, tag=_tag(kind, t.shape, t.dtype)), t))

    def _receive(self, kind: str, shape, dtype, ahead: bool, peer: Optional[int] = None) -> torch.Tensor:
        peer = self.ranks[self.stage - 1] if peer is None else peer
        tag = _tag(kind, shape, dtype)
        queue = self._posted.setdefault((peer, tag), deque())
        ahead = ahead and self.post_ahead and torch.Size(shape).numel() <= AHEAD_MAX_ELEMENTS
        device = self.model.norm.weight.device
        while len(queue) < (AHEAD + 1 if ahead else 1):
            buffer = torch.empty(shape, dtype=dtype, device=device)
            queue.append((buffer, dist.irecv(buffer, peer, self.group, tag=tag)))
        buffer, request = queue.popleft()
        request.wait()
        return buffer


@dataclass
class PendingDecode:
    """A decoding pass `ModelRunner.launch_decode` started: its rows, its kind,
    and on the last stage its result (ids (rows,) or logits (rows, vocab))."""

    rows: int
    argmax_only: bool
    result: Optional[torch.Tensor]


@dataclass
class PendingPrefill:
    """A prefill pass `ModelRunner.launch_prefill` started: the logits rows of
    each prompt, and on the last stage the logits (sum of sizes, vocab)."""

    sizes: List[int]
    result: Optional[torch.Tensor]


def _tag(kind: str, shape, dtype) -> int:
    """The same on sender and receiver, different for each kind and shape of
    message (a posted receive takes only its own)."""
    return zlib.crc32(f"{kind} {tuple(shape)} {dtype}".encode()) & 0x3FFFFFFF
