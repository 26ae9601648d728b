"""`llama info`, `llama shard` and `llama convert`: work on checkpoint directories."""

import argparse
import importlib.util
import sys
from pathlib import Path

from .info import checkpoint_info


def add_info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", type=Path, help="checkpoint directory")
    p.add_argument("--tokenizer_path", help="tokenizer.model (default: found in the directory, or its parent)")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")


def info(a: argparse.Namespace) -> None:
    facts = checkpoint_info(a.ckpt_dir, a.tokenizer_path)
    print(facts.to_json() if a.json else facts.report())


def add_shard_args(p: argparse.ArgumentParser) -> None:
    # The flags of utils/shard_model_checkpoint.py.
    p.add_argument("-n", "--num_shards", type=int, required=True, help="number of output shards (workers)")
    p.add_argument("-i", "--input", type=Path, required=True, help="input checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--pipeline_stages", type=int, default=1,
                   help="write one folder per pipeline stage, each with -n shards of its layers (default 1)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.model to copy (default: the input's, if any)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")


def shard(a: argparse.Namespace) -> None:
    from ..weights.writer import reshard_checkpoint

    reshard_checkpoint(a.input, a.output, a.num_shards, tokenizer_path=a.tokenizer, force=a.force,
                       pipeline_stages=a.pipeline_stages)
    print(f"done: {a.output}")


CONVERTER = "utils/convert_gguf_checkpoint.py"


def _converter():
    """The GGUF converter's module. It lives in the repository's utils/, which
    pip does not install: it is loaded from the clone this package runs from
    (a clone, or an editable install of one), else from the working directory."""
    for clone in (Path(__file__).resolve().parents[2], Path.cwd()):
        path = clone / CONVERTER
        if path.is_file():
            if str(clone) not in sys.path:
                sys.path.append(str(clone))  # for its own `utils.` imports, if it has any
            spec = importlib.util.spec_from_file_location("llama_gguf_converter", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError as e:
                raise FileNotFoundError(f"llama convert needs the {e.name} package: pip install gguf "
                                        "(or pip install -e \".[gguf]\" in the clone)") from e
            return module
    raise FileNotFoundError(
        f"llama convert needs {CONVERTER} from a clone of the repository (pip installs only the llama "
        "package): run `pip install -e .` in a clone, or run the command from the clone's directory"
    )


def convert(a: argparse.Namespace) -> None:
    converter = _converter()
    sys.argv[0] = "llama convert"  # the name its usage lines show
    converter.main(a.converter_args)
