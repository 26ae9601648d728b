"""Checkpoints split into pipeline stages: which layers a stage holds, and
which folder a stage reads. No torch.

`utils/shard_model_checkpoint.py --pipeline_stages P` writes one folder per
stage, `stage0/` .. `stage{P-1}/`, each a checkpoint of its own
(params.json, tokenizer, consolidated.NN.pth of only that stage's layers,
keys keeping their global layer numbers, checklist.chk, manifest.json) plus
`pipeline.json`, which says which stage and layers it holds, by which rule
the layers were split ("split"), and, under "model", a digest of the whole
checkpoint it was split from.

The split (stage_layers): contiguous layers, at least one per stage, by
cost. A token costs a stage about its parameters' multiply-adds: each
transformer layer its attention and feed-forward weights, and the last stage
also the output layer (vocab_size x dim: for Llama 3.1 8B 2.4 layers' worth,
for a tiny test model more than all its layers), while stage 0's embedding
costs one row a token. Stage boundary k goes to the layer boundary nearest
k/P of the total cost, so the last stage takes fewer layers. Stages that
work at once (the engine's lanes) go at the pace of the slowest, so an even
split left the other stages idle for the output layer's time (the 8B shape
on 2 stages: 16 layers against 16 and the output). Stage folders written
before the rule existed have no "split" and hold the even split ("even");
they still load, and the rule joins the settings every rank compares at
start-up (a whole checkpoint uses the cost rule), so nodes given folders of
both rules stop naming it. A node needs
only its stages' folders. `--ckpt_dir` may name the folder holding the stage
folders (the same command on every node), one stage's folder, or a whole
checkpoint (each stage then reads only its layers from it).

pipeline.json comes with the folder, so it is read as untrusted input:
through `jsonfile.read_json_object` (a regular file of at most 1 MiB, nesting
and NaN refused), then every field is checked; anything wrong is one
ValueError naming the file and the fix (split the checkpoint again).

The whole-model digest (checkpoint_digest) is what lets nodes holding
different stages check that their stages come from one checkpoint: a stage
folder holds none of the other stages' files, so nothing else it has can be
compared with theirs. It is a sha256 of params.json's values and every
shard's name, size and manifest fingerprint (the first and last MiB, as
manifest.json records them), so it costs milliseconds to compute when
splitting, and a whole checkpoint with a manifest.json gives the same digest
from its manifest without reading any shard. It identifies the files, not the
tensors: a stage folder split from a copy with another number of shards has
another digest. Folders written before the digest existed have none
(model_digest gives None): they still load, but the comparison then only
happens if no node has a digest.
"""

import hashlib

import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..common.jsonfile import read_json_object
from . import manifest

NAME = "pipeline.json"
_STAGE_DIR = re.compile(r"stage(\d+)")


# The split rules pipeline.json names: "cost" (this version's), "even" (the
# folders written before the rule was recorded, which have no "split").
SPLIT = "cost"
SPLITS = ("cost", "even")


def stage_costs(args) -> Tuple[int, int]:
    """(a transformer layer's, the output layer's) parameters, each a
    multiply-add per token: `args` a ModelArgs with vocab_size resolved."""
    if args.vocab_size < 1:
        raise ValueError(f"vocab_size {args.vocab_size} is not resolved: take it from the tokenizer or the weights "
                         "before splitting into stages")
    kv = args.n_kv_heads * args.head_dim
    attention = args.dim * (2 * args.n_heads * args.head_dim + 2 * kv)  # wq, wo; wk, wv
    return attention + 3 * args.dim * args.ffn_hidden_dim, args.vocab_size * args.dim


def stage_layers(args, stages: int, stage: int, split: str = SPLIT) -> range:
    """The global layer indices stage `stage` of `stages` holds (`args` a
    ModelArgs): contiguous, at least one, by `split` (see the module
    docstring): "cost", boundary k at the layer boundary nearest k/P of the
    total cost; "even", as even as can be."""
    n = args.n_layers
    if n < stages:
        raise ValueError(f"the model has {n} layers, too few for {stages} pipeline stages (each stage needs "
                         f"at least one layer): use at most {n} stages")
    if split not in SPLITS:
        raise ValueError(f"unknown stage split {split!r}: one of {', '.join(SPLITS)}")
    if split == "even":
        return range(stage * n // stages, (stage + 1) * n // stages)
    layer, output = stage_costs(args)
    total = n * layer + output

    def boundary(k: int) -> int:
        if k in (0, stages):
            return k and n
        nearest = (2 * k * total + stages * layer) // (2 * stages * layer)  # round(k * total / (stages * layer))
        return max(k, min(nearest, n - (stages - k)))  # a layer at least for every stage

    # Boundaries k / stages of the cost apart are at least one layer apart, so
    # the clamped ones still rise by one layer at least.
    return range(boundary(stage), boundary(stage + 1))


def stage_dir_name(stage: int) -> str:
    return f"stage{stage}"


_DIGEST = re.compile(r"[0-9a-f]{32}")


def checkpoint_digest(params: dict, shards: Dict[str, Tuple[int, str]]) -> str:
    """The whole model's digest: params.json's values (not its spacing) and
    each shard's (size, manifest fingerprint) by file name."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for name in sorted(shards):
        size, fingerprint = shards[name]
        h.update(f"\0{name}\0{size}\0{fingerprint}".encode())
    return h.hexdigest()[:32]


def model_digest(folder) -> Optional[str]:
    """The digest of the whole checkpoint `folder` is part of: a stage
    folder's recorded one; for a whole checkpoint, the one its params.json and
    complete manifest.json give. None where neither says (a stage folder
    split by an older version, a checkpoint without manifest, files that
    cannot be read: the loader reports those errors itself). Never raises."""
    folder = Path(folder)
    try:
        record = read_record(folder)
        if record is not None:
            return record.get("model")
        data = manifest.read_manifest(folder)
        if data is None or not data["complete"]:
            return None
        params = read_json_object(folder / "params.json", missing="", fix="")
        return checkpoint_digest(params, {name: (v["size"], v["fingerprint"]) for name, v in data["files"].items()})
    except (OSError, ValueError):
        return None


def stage_record(stage: int, stages: int, args, shards: int, model: Optional[str] = None) -> str:
    """The text of a stage folder's pipeline.json (`args` the ModelArgs, vocab
    resolved); `model`: the whole checkpoint's digest."""
    layers = stage_layers(args, stages, stage)
    record = {"stage": stage, "stages": stages, "layers": [layers.start, layers.stop], "n_layers": args.n_layers,
              "split": SPLIT, "shards": shards}
    if model is not None:
        record["model"] = model
    return json.dumps(record, indent=1) + "\n"


def read_record(folder: Path) -> Optional[dict]:
    """A stage folder's pipeline.json, checked; None if `folder` has none.
    ValueError (naming the file and the fix) for anything else: not a regular
    file, too large, not JSON, or not the fields this version writes."""
    path = Path(folder) / NAME
    if not os.path.lexists(path):
        return None
    fix = "split the checkpoint again with utils/shard_model_checkpoint.py --pipeline_stages N"
    data = read_json_object(path, missing=fix, fix=fix)
    layers = data.get("layers")
    values = [data.get("stage"), data.get("stages"), data.get("n_layers")]
    if isinstance(layers, list) and len(layers) == 2:
        values += layers
    ok = (len(values) == 5 and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
          and 0 <= data["stage"] < data["stages"] and 0 <= layers[0] <= layers[1] <= data["n_layers"]
          and data.get("split", "even") in SPLITS
          and ("model" not in data or isinstance(data["model"], str) and _DIGEST.fullmatch(data["model"])))
    if not ok:
        raise ValueError(f"{path} is not a pipeline stage record this version writes; {fix}")
    return data


def stage_folders(ckpt_dir) -> dict:
    """The stage folders (stageN/ with a pipeline.json) inside `ckpt_dir`, by stage number."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in ckpt_dir.iterdir()
            if (m := _STAGE_DIR.fullmatch(p.name)) and os.path.lexists(p / NAME)}


def model_folder(ckpt_dir) -> Path:
    """Where params.json (and usually the tokenizer) is: `ckpt_dir`, or, for a
    folder of stage folders, the first stage folder it holds."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "params.json").exists():
        return ckpt_dir
    folders = stage_folders(ckpt_dir)
    return folders[min(folders)] if folders else ckpt_dir


def stage_folder(ckpt_dir, stages: int, stage: int, args, rank: int = 0) -> Tuple[Path, Optional[range], str]:
    """(the folder stage `stage` of `stages` loads, the layers its files hold:
    None for a whole checkpoint, the split rule its layers follow: the cost
    rule for a whole checkpoint). `args`: params.json's ModelArgs, vocab
    resolved. Raises ValueError naming both numbers and the fix when the
    folder was split for another number of stages or holds another stage."""
    n_layers = args.n_layers
    ckpt_dir = Path(ckpt_dir)
    who = f"rank {rank} (pipeline stage {stage} of {stages})"
    record, folder = read_record(ckpt_dir), ckpt_dir
    if record is None:
        folders = stage_folders(ckpt_dir)
        if not folders:
            if stages > 1:
                stage_layers(args, stages, stage)  # too few layers: said before anything is read
            return ckpt_dir, None, SPLIT  # a whole checkpoint: each stage reads its layers from it
        split = read_record(folders[min(folders)])["stages"]
        if split != stages:
            raise ValueError(_other_split(ckpt_dir, split, stages))
        if stage not in folders:
            raise ValueError(f"{ckpt_dir} lacks {stage_dir_name(stage)}/, which {who} needs (it holds "
                             f"{', '.join(stage_dir_name(s) for s in sorted(folders))}): copy "
                             f"{stage_dir_name(stage)}/ of the split checkpoint into it")
        folder = folders[stage]
        record = read_record(folder)
    if record["stages"] != stages:
        raise ValueError(_other_split(folder, record["stages"], stages))
    if record["stage"] != stage:
        raise ValueError(f"{folder} holds pipeline stage {record['stage']}, but {who} needs stage {stage}: give "
                         f"each node the folder of its own stage (rank = stage x processes per stage + local "
                         f"rank), or pass the folder that holds the {stage_dir_name(0)}/ .. folders")
    layers, split = range(*record["layers"]), record.get("split", "even")
    if record["n_layers"] != n_layers or layers != stage_layers(args, stages, stage, split):
        raise ValueError(f"{folder / NAME} says stage {stage} holds layers {layers.start}..{layers.stop - 1} of "
                         f"{record['n_layers']}, not what params.json (n_layers={n_layers}) and its {split} split "
                         "give; split the checkpoint again")
    return folder, layers, split


def _other_split(folder: Path, split: int, stages: int) -> str:
    return (f"{folder} holds a checkpoint split into {split} pipeline stages, but this run has {stages} "
            f"(--pipeline_stages {stages}): run it with --pipeline_stages {split} ({split} x the tensor-parallel "
            f"size processes), or split the whole checkpoint again with utils/shard_model_checkpoint.py "
            f"--pipeline_stages {stages}")


def find_tokenizer(ckpt_dir, tokenizer_path=None) -> Path:
    """`tokenizer_path` if given, else tokenizer.model in the checkpoint
    directory (Llama 3 / 3.1, converted models) or in its parent (Llama 2's
    download puts one there for all sizes)."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    ckpt_dir = model_folder(ckpt_dir)  # a folder of pipeline stage folders: the first one's
    places = [ckpt_dir / "tokenizer.model", ckpt_dir.resolve().parent / "tokenizer.model"]
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError(
        f"no tokenizer.model found; looked in {places[0]} and {places[1]}. "
        "Pass --tokenizer_path with the tokenizer.model that came with these weights"
    )
