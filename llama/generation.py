"""`Llama`: build a model from a Meta checkpoint and generate text with it.

The public API is that of Meta's reference repositories (`Llama.build`,
`generate`, `text_completion`, `chat_completion`, same result dicts), plus
`device`/`dtype` parameters and token streaming.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict

import torch

from .args import ModelArgs
from .chat_format import ChatFormat, Dialog, Message, StopReason
from .checkpoint import check_cache_memory, load_rank_state
from .distributed import init_distributed, is_rank0, resolve_dtype
from .fingerprint import check_same_checkpoint
from .linear import QUANTIZATIONS, use_kernels
from .metrics import GenerationMetrics, MetricsRecorder
from .model import Transformer
from .tokenizer import Tokenizer

logger = logging.getLogger("llama")
# The metrics block of every generation, logged (INFO) on rank 0; a program
# that prints the block itself can silence just this logger.
metrics_logger = logging.getLogger("llama.metrics")


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True
    metrics: dict  # GenerationMetrics.to_dict() of the batch


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # with logprobs=True
    logprobs: List[float]  # with logprobs=True
    metrics: dict  # GenerationMetrics.to_dict() of the batch


@dataclass
class TokenEvent:
    """One newly decoded token of one prompt, as `generate_stream` yields it."""

    row: int  # index of the prompt in the batch
    token: int
    text: str  # text this token adds; "" while a multi-byte character is incomplete
    logprob: Optional[float] = None
    stop_reason: Optional[StopReason] = None  # set on the row's last event only


class GenerationResult(tuple):
    """`(tokens, logprobs)` as Meta's `generate` returns them, plus `.metrics`."""

    metrics: Optional[GenerationMetrics]

    def __new__(cls, tokens, logprobs, metrics: Optional[GenerationMetrics] = None):
        result = super().__new__(cls, (tokens, logprobs))
        result.metrics = metrics
        return result


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Loads a Meta checkpoint for inference on this process's model-parallel rank.

        Args:
            ckpt_dir: Directory with params.json and consolidated.*.pth. Any
                number of shards works if the world size can be split from it.
            tokenizer_path: tokenizer.model, SentencePiece (Llama 2) or tiktoken (Llama 3).
            max_seq_len: Longest prompt plus generation, in tokens (sizes the KV cache).
            max_batch_size: Most prompts generated together (sizes the KV cache).
            model_parallel_size: Defaults to the number of processes (torchrun's
                WORLD_SIZE, or 1 under plain python).
            seed: Sampling seed; must be the same on every rank.
            device: "cpu" or "cuda"; default CUDA if available.
            dtype: "bfloat16", "float32" or "float16"; default bfloat16.
            quantize: "int8" for weight-only int8 linear layers (per output
                channel, applied to each rank's shard after loading), or None.

        Returns:
            A ready `Llama`.

        Raises:
            FileNotFoundError, ValueError: with a message naming the bad input.
        """
        start = time.perf_counter()
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantize!r}; use 'int8' or leave it unset")
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not Path(ckpt_dir).is_dir():
            raise FileNotFoundError(f"checkpoint directory {ckpt_dir} not found (--ckpt_dir)")
        tokenizer = Tokenizer.from_file(tokenizer_path)
        args = ModelArgs.from_json(Path(ckpt_dir) / "params.json", max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        raw_vocab_size = args.vocab_size
        args = _with_tokenizer_vocab(args, tokenizer, ckpt_dir)

        dist_info = init_distributed(device, model_parallel_size)
        torch_dtype = resolve_dtype(dtype, dist_info.device)
        torch.manual_seed(seed)

        check_same_checkpoint(ckpt_dir, tokenizer_path, dtype=torch_dtype, quantize=quantize, max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed)  # issue 13 (helper): every node loads the same checkpoint
        check_cache_memory(args, dist_info.world_size, dist_info.device, torch_dtype)  # issue 13 (helper): KV cache vs free memory, before allocating
        state, layout = load_rank_state(ckpt_dir, args, dist_info.rank, dist_info.world_size, raw_vocab_size)
        state = {k: v.to(device=dist_info.device, dtype=torch_dtype).contiguous() for k, v in state.items()}
        with torch.device("meta"):
            model = Transformer(args, embedding_layout=layout)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        use_kernels(model, quantize)
        model.setup_caches(dist_info.device, torch_dtype)
        model.eval()
        logger.info("Loaded %s on %s (%s%s, rank %d of %d) in %.2f s", ckpt_dir, dist_info.device,
                    str(torch_dtype).replace("torch.", ""), ", int8 weights" if quantize else "",
                    dist_info.rank, dist_info.world_size, time.perf_counter() - start)
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat.for_tokenizer(tokenizer)
        self.last_metrics: Optional[GenerationMetrics] = None  # of the last finished generation
        # Weights one decoding step reads, over all ranks (a step reads only B
        # rows of the embedding table).
        self.weight_bytes_per_step = _world_size() * sum(
            p.nbytes for name, p in model.named_parameters() if not name.startswith("tok_embeddings.")
        )

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generates continuations of tokenized prompts.

        Prompts may differ in length. Each row stops at its first stop token
        (not included in the output) or after `max_gen_len` tokens.

        Args:
            prompt_tokens: One list of token ids per prompt.
            max_gen_len: Most tokens to generate per prompt.
            temperature: 0 means greedy; higher flattens the distribution.
            top_p: Nucleus sampling threshold.
            logprobs: Also return the log-probability of each returned token.
            echo: Include the prompt tokens (and their logprobs) in the output.

        Returns:
            (tokens per prompt, logprobs per prompt or None), a tuple that
            also carries the call's `GenerationMetrics` as `.metrics`.
        """
        tokens, token_logprobs, _ = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return GenerationResult(tokens, token_logprobs, self.last_metrics)

    @torch.inference_mode()
    def _generate(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo=False):
        """`generate`, plus the StopReason of each row."""
        rows = _Rows(prompt_tokens, echo)
        for cur_pos, next_tokens, token_logprobs in self._decode(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
            rows.record(cur_pos, next_tokens, token_logprobs)
        return rows.result(self.tokenizer, max_gen_len, logprobs)

    @torch.inference_mode()
    def generate_stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
    ) -> Iterator[TokenEvent]:
        """Like `generate`, but yields each new token as soon as it is decoded.

        Events come in decoding order, one per row and step while the row is
        still generating; a row's last event carries its `stop_reason` (on a
        stop token, the event's token is that stop token and its text only
        what was held back, if anything). Joining a row's texts gives the
        decoded generation.
        """
        texts = [_TextStream(self.tokenizer) for _ in prompt_tokens]
        finished = [False] * len(prompt_tokens)
        for cur_pos, next_tokens, token_logprobs in self._decode(prompt_tokens, max_gen_len, temperature, top_p, logprobs, False):
            next_list = next_tokens.tolist()
            lp_list = token_logprobs.tolist() if token_logprobs is not None else None
            for row, tok in enumerate(next_list):
                if finished[row] or cur_pos < len(prompt_tokens[row]):
                    continue
                generated = cur_pos - len(prompt_tokens[row]) + 1
                stop = None
                if tok in self.tokenizer.stop_tokens:
                    stop, text = StopReason.for_stop_token(tok, self.tokenizer), texts[row].flush()
                else:
                    text = texts[row].add(tok)
                    if generated >= max_gen_len or cur_pos + 1 >= self.model.params.max_seq_len:
                        stop, text = StopReason.OUT_OF_TOKENS, text + texts[row].flush()
                finished[row] = stop is not None
                yield TokenEvent(row, tok, text, lp_list[row] if lp_list else None, stop)

    def _decode(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo):
        """The decoding loop shared by `generate` and `generate_stream`.

        Yields (position, token per row, logprob per row or None) per step,
        tensors on the model's device. Rows whose prompt is longer than the
        shortest one are fed their own prompt tokens until it runs out (as in
        Meta's reference), so every row sees exactly its own tokens.
        """
        params = self.model.params
        self._check_prompts(prompt_tokens, max_gen_len)
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        min_len, max_len = min(prompt_lens), max(prompt_lens)
        total_len = min(params.max_seq_len, max_gen_len + max_len)
        device = self.device

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        lens = torch.tensor(prompt_lens, device=device)
        is_prompt = torch.arange(total_len, device=device)[None, :] < lens[:, None]
        last_pos = lens + max_gen_len - 1  # a row's last position to generate
        stop_tokens = torch.tensor(sorted(self.tokenizer.stop_tokens), dtype=torch.long, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)
        n_generated = torch.zeros(bsz, dtype=torch.long, device=device)
        # On a GPU, checking whether all rows are done costs a host sync: do it every 8 steps.
        check_every = 1 if device.type == "cpu" else 8
        recorder = MetricsRecorder(
            bsz, sum(prompt_lens), self.weight_bytes_per_step, _world_size(),
            synchronize=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        )

        if min_len == total_len and echo and logprobs:  # nothing to generate: prompt logprobs only
            yield from _prompt_logprobs(self.model.forward(tokens, 0), tokens)
        prev_pos = 0
        for cur_pos in range(min_len, total_len):
            # Logits for every position only when echoed prompt logprobs need them.
            all_logits = echo and logprobs and prev_pos == 0
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_logits_only=not all_logits)
            if all_logits:
                yield from _prompt_logprobs(logits, tokens[:, :cur_pos])
            logits = logits[:, -1]  # (bs, vocab)
            next_token = sample(logits, temperature, top_p)
            next_token = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            recorder.step()
            token_logprobs = None
            if logprobs:
                token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, next_token[:, None])[:, 0]
            yield cur_pos, next_token, token_logprobs
            generating = ~is_prompt[:, cur_pos] & ~done
            n_generated += generating
            done |= generating & (torch.isin(next_token, stop_tokens) | (cur_pos >= last_pos))
            prev_pos = cur_pos
            if (cur_pos - min_len) % check_every == check_every - 1 and bool(done.all()):
                break
        self.last_metrics = recorder.finish(int(n_generated.sum()))
        if is_rank0():
            metrics_logger.info("%s", self.last_metrics.report())

    def _check_prompts(self, prompt_tokens, max_gen_len) -> None:
        params = self.model.params
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}; "
                "pass fewer prompts or build with a larger max_batch_size"
            )
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be a non-negative integer, got {max_gen_len!r}")
        for i, t in enumerate(prompt_tokens):
            if not t:
                raise ValueError(f"prompt {i} is empty")
            if len(t) >= params.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(t)} tokens, which leaves no room to generate within "
                    f"max_seq_len={params.max_seq_len}; shorten it or build with a larger max_seq_len"
                )
            if min(t) < 0 or max(t) >= params.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside 0..{params.vocab_size - 1}")

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Completes each text prompt.

        Args:
            prompts: Texts to continue (a bos token is prepended).
            temperature, top_p, logprobs, echo: as in `generate`.
            max_gen_len: Default: max_seq_len - 1.

        Returns:
            One {"generation": str} per prompt (plus "tokens" and "logprobs" if asked).
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        metrics = self.last_metrics.to_dict()
        return [self._prediction(self.tokenizer.decode(t), t, lps[i] if logprobs else None, metrics)
                for i, t in enumerate(tokens)]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Generates the assistant's next message for each dialog.

        Args:
            dialogs: Lists of {"role", "content"} messages in the model family's
                order (optional system first, then user/assistant turns, ending
                with user; Llama 3 also takes ipython tool results, and
                assistant messages with "tool_calls", see `Message`).
            temperature, top_p, logprobs: as in `generate`.
            max_gen_len: Default: max_seq_len - 1.

        Returns:
            One {"generation": message} per dialog (plus "tokens" and
            "logprobs" if asked), the message being {"role": "assistant",
            "content": str, "tool_calls": [ToolCall, ...], "stop_reason":
            StopReason}: END_OF_MESSAGE means the model waits for the result
            of its tool calls (send it as an "ipython" message), OUT_OF_TOKENS
            that the answer was cut off.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        tokens, lps, reasons = self._generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        metrics = self.last_metrics.to_dict()
        return [
            self._prediction(self.formatter.decode_assistant_message(t, reasons[i]), t, lps[i] if logprobs else None, metrics)
            for i, t in enumerate(tokens)
        ]

    def chat_completion_stream(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[TokenEvent]:
        """Streams the assistant's next message for one dialog, token by token."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        yield from self.generate_stream([self.formatter.encode_dialog_prompt(dialog)], max_gen_len, temperature, top_p)

    def _prediction(self, generation, tokens: List[int], logprobs: Optional[List[float]], metrics: dict) -> dict:
        """Meta's result dict, plus the batch's metrics under "metrics"."""
        result = {"generation": generation, "metrics": metrics}
        if logprobs is not None:
            result.update(tokens=[self.tokenizer.decode([x]) for x in tokens], logprobs=logprobs)
        return result


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _with_tokenizer_vocab(args: ModelArgs, tokenizer: Tokenizer, ckpt_dir) -> ModelArgs:
    """Resolves vocab_size -1 (Llama 2) and checks the tokenizer fits the model."""
    if args.vocab_size == -1:
        return dataclasses.replace(args, vocab_size=tokenizer.n_words)
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(
            f"{tokenizer.path} has {tokenizer.n_words} tokens but {Path(ckpt_dir) / 'params.json'} says "
            f"vocab_size={args.vocab_size}: this tokenizer belongs to another model (Llama 2 uses a "
            "32000-token SentencePiece tokenizer.model, Llama 3 and 3.1 a 128256-token tiktoken one); "
            "pass the tokenizer.model that came with these weights"
        )
    return args


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row of `logits` (bs, vocab): greedy at temperature 0, else top-p."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Samples from the smallest set of tokens whose probability mass exceeds `p`."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)[:, 0]


def _prompt_logprobs(logits: torch.Tensor, tokens: torch.Tensor):
    """(position, token, logprob) steps for prompt positions 1..n-1, for echo."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    for pos in range(1, tokens.shape[1]):
        yield pos, tokens[:, pos], lp[:, pos - 1]


class _Rows:
    """Collects `_decode` steps into per-row token and logprob lists."""

    def __init__(self, prompt_tokens: Sequence[List[int]], echo: bool):
        self.prompt_tokens = prompt_tokens
        self.echo = echo
        self.tokens = [list(t) for t in prompt_tokens]  # each row: prompt, then what follows
        self.logprobs = [[0.0] * len(t) for t in prompt_tokens]  # position 0 has no logprob

    def record(self, pos: int, next_tokens: torch.Tensor, token_logprobs: Optional[torch.Tensor]) -> None:
        lps = token_logprobs.tolist() if token_logprobs is not None else None
        for row, tok in enumerate(next_tokens.tolist()):
            if pos < len(self.tokens[row]):  # a prompt position (echo logprobs)
                if lps is not None:
                    self.logprobs[row][pos] = lps[row]
            elif pos == len(self.tokens[row]):
                self.tokens[row].append(tok)
                self.logprobs[row].append(lps[row] if lps is not None else 0.0)

    def result(self, tokenizer: Tokenizer, max_gen_len: int, logprobs: bool):
        """(tokens, logprobs or None, stop reasons), one entry per row."""
        out_tokens, out_logprobs, stop_reasons = [], [], []
        for row, toks in enumerate(self.tokens):
            n_prompt = len(self.prompt_tokens[row])
            end = min(len(toks), n_prompt + max_gen_len)
            reason = StopReason.OUT_OF_TOKENS
            for i in range(n_prompt, end):  # cut at the first stop token the model produced
                if toks[i] in tokenizer.stop_tokens:
                    end, reason = i, StopReason.for_stop_token(toks[i], tokenizer)
                    break
            start = 0 if self.echo else n_prompt
            out_tokens.append(toks[start:end])
            out_logprobs.append(self.logprobs[row][start:end])
            stop_reasons.append(reason)
        return out_tokens, (out_logprobs if logprobs else None), stop_reasons


class _TextStream:
    """Turns one row's tokens into text increments.

    Decoding a token on its own loses context (SentencePiece drops a leading
    space; a multi-byte character may span tokens), so each step decodes a
    short window and emits what it adds, holding back incomplete characters.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: List[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens before this are emitted

    def add(self, token: int) -> str:
        self.tokens.append(token)
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(prefix_text):
            return ""  # wait for the rest of a multi-byte character
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return text[len(prefix_text) :]
