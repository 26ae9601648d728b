"""Text completion with a pretrained Llama model.

    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --device cpu

Runs under plain `python` too, and on any number of processes or machines
(see the README's "Distributed inference").
"""

from typing import Optional

from llama import Llama
from llama.weights.stages import find_tokenizer
from llama.cli.run import run
from llama.parallel.distributed import is_rank0, print_rank0
from llama.engine.metrics import write_json

PROMPTS = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    pipeline_stages: int = 1,
    metrics_json: Optional[str] = None,
    threads: Optional[int] = None,
    compile: bool = False,
):
    """Completes a few example prompts, in batches of max_batch_size.

    Args:
        ckpt_dir: Meta checkpoint directory (params.json, consolidated.*.pth).
        tokenizer_path: tokenizer.model (Llama 2 SentencePiece or Llama 3 tiktoken);
            default: the one in ckpt_dir, or in its parent (Llama 2).
        temperature: 0 for greedy decoding.
        top_p: Nucleus sampling threshold.
        max_seq_len: Prompt plus generation, in tokens.
        max_gen_len: Tokens to generate per prompt.
        max_batch_size: Prompts decoded together (all are completed: the others wait for a free row).
        device: "cpu" or "cuda" (default: cuda if available).
        dtype: "bfloat16", "float32" or "float16" (GPU only); default: bfloat16 where the
            hardware computes it natively, else float32 (CPU) or float16 (GPU).
        quantize: "int8" or "int4" (our CPU kernels only) for quantized linear layers.
        pipeline_stages: Under torchrun, split the layers into this many stages
            (world size / stages processes each), for nodes behind slow links.
        metrics_json: Also write the inference metrics here (a JSON list with one entry).
        threads: CPU threads per process (default: the physical cores this process may
            run on, divided among the processes on this node).
        compile: Decode through a torch.compile'd transformer block (faster per token;
            the first start compiles for tens of seconds, cached on disk afterwards).

    After the completions the inference metrics block is printed.
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
    results = generator.text_completion(PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(PROMPTS, results):
        print_rank0(prompt)
        print_rank0(f"> {result['generation']}")
        print_rank0("\n==================================\n")
    print_rank0(generator.last_metrics.report())
    if metrics_json and is_rank0():
        write_json([generator.last_metrics], metrics_json)


if __name__ == "__main__":
    run(main)
