"""Chat with an instruction-tuned Llama model; answers stream as they are decoded.

    torchrun --nproc_per_node 1 example_chat_completion.py \
        --ckpt_dir Meta-Llama-3-8B-Instruct/ \
        --tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model --device cpu

With --interactive it is a multi-turn chat on the terminal instead (the same
as `llama chat`), in which Llama 3.1 can call a local calculator and clock.

Runs under plain `python` too, and on any number of processes or machines
(see the README's "Distributed inference").
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.chat.session import ChatSession
from llama.weights.stages import find_tokenizer
from llama.cli.run import run
from llama.parallel.distributed import is_rank0, print_rank0
from llama.engine.metrics import write_json

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": "Paris, the capital of France, is known for its stunning architecture, art museums, "
            "historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:\n\n"
            "1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world "
            "and offers breathtaking views of the city.\n"
            "2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an "
            "impressive collection of art and artifacts, including the Mona Lisa.\n"
            "3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is "
            "known for its Gothic architecture and stunning stained glass windows.",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    stream: bool = True,
    interactive: bool = False,
    quantize: Optional[str] = None,
    pipeline_stages: int = 1,
    metrics_json: Optional[str] = None,
    threads: Optional[int] = None,
    compile: bool = False,
    system: Optional[str] = None,
):
    """Answers a few example dialogs.

    Args:
        ckpt_dir: Meta checkpoint directory (params.json, consolidated.*.pth).
        tokenizer_path: tokenizer.model (Llama 2 SentencePiece or Llama 3 tiktoken);
            default: the one in ckpt_dir, or in its parent (Llama 2).
        temperature: 0 for greedy decoding.
        top_p: Nucleus sampling threshold.
        max_seq_len: Dialog plus answer, in tokens.
        max_batch_size: Dialogs decoded together when not streaming (all of
            them are answered: the others wait for a free row).
        max_gen_len: Most tokens per answer (default: until the model stops or the context is full).
        device: "cpu" or "cuda" (default: cuda if available).
        dtype: "bfloat16", "float32" or "float16" (GPU only); default: bfloat16 where the
            hardware computes it natively, else float32 (CPU) or float16 (GPU).
        stream: Print each answer token by token (one dialog at a time);
            --nostream answers all dialogs in one call, then prints the answers and the metrics.
        interactive: Chat on the terminal instead of answering the examples
            (/help lists the commands; an empty line or Ctrl-D ends).
        quantize: "int8" or "int4" (our CPU kernels only) for quantized linear layers.
        pipeline_stages: Under torchrun, split the layers into this many stages
            (world size / stages processes each), for nodes behind slow links.
        metrics_json: Write the inference metrics of every generation here (a JSON list).
        threads: CPU threads per process (default: the physical cores this process may
            run on, divided among the processes on this node).
        compile: Decode through a torch.compile'd transformer block (faster per token;
            the first start compiles for tens of seconds, cached on disk afterwards).
        system: The system prompt of the interactive chat.

    After each answer (or all answers, with --nostream) the inference
    metrics block is printed.
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=str(find_tokenizer(ckpt_dir, tokenizer_path)),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        quantize=quantize,
        threads=threads,
        compile=compile,
        pipeline_stages=pipeline_stages,
    )
    if interactive:
        write = lambda text: print_rank0(text, end="", flush=True)  # noqa: E731
        ChatSession(generator, write, temperature, top_p, max_gen_len, system=system).run()
        return
    metrics = []
    if not stream:
        results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for dialog, result in zip(DIALOGS, results):
            print_dialog(dialog)
            print_rank0(result["generation"]["content"])
            print_rank0("\n==================================\n")
        print_rank0(generator.last_metrics.report())
        metrics.append(generator.last_metrics)
    for dialog in DIALOGS if stream else []:
        print_dialog(dialog)
        for event in generator.chat_completion_stream(dialog, temperature, top_p, max_gen_len):
            print_rank0(event.text, end="", flush=True)
        print_rank0("\n")
        print_rank0(generator.last_metrics.report())
        metrics.append(generator.last_metrics)
        print_rank0("\n==================================\n")
    if metrics_json and is_rank0():
        write_json(metrics, metrics_json)


def print_dialog(dialog: Dialog) -> None:
    for msg in dialog:
        print_rank0(f"{msg['role'].capitalize()}: {msg['content']}\n")
    print_rank0("> Assistant: ", end="", flush=True)


if __name__ == "__main__":
    run(main)
