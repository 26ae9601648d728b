"""Every node must load the same checkpoint with the same settings.

Each rank describes what it is about to load in a few hundred bytes (hashes
of params.json, the tokenizer, manifest.json and checklist.chk; the sizes of
the shard files it has; a hash of the weights every shard repeats (the
norms); dtype and the runtime limits) and all ranks exchange these at build
time, together with any error the rank met preparing its load. A node whose
folder holds another checkpoint would otherwise load and generate garbage,
or fail later in a collective with a raw error, while the others wait for
it; here every rank stops at once with a message naming the node and what
differs. Costs milliseconds: nothing is read but the small files and the
norms (memory-mapped).

A node may hold only its own ranks' shard files: shard sizes are compared
only for the files both ranks have. With pipeline stages, what differs from
stage to stage (the files of a stage's folder, the norms of its layers) is
compared between the ranks of one stage only; so that nodes holding
different stages (one node per stage: nothing else is common to them) still
find out that their stages come from different checkpoints of the same
shape, the caller passes the whole model's digest (`model`, which a stage
folder's pipeline.json records: llama/weights/stages.py), compared across all
ranks. Stage folders split before the digest existed have none: the
comparison is skipped when no rank has one, and a rank without one beside
ranks with one is a difference (split the checkpoint again).

A difference names the ranks, their nodes and folders, and what differs with
both values: the params.json fields (`n_layers 6 vs 8`), the shard files and
their sizes, the settings, or the short hashes of the other files.
"""

import hashlib
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional

from ..common.jsonfile import read_json_object

# Files that not every copy of a checkpoint has (a folder copied by hand may
# lack the checklist): compared only between ranks that have them.
_OPTIONAL = ("manifest.json", "checklist.chk", "pipeline.json")
# What a stage-split checkpoint has for each stage (llama/weights/stages.py).
_PER_STAGE = ("shard sizes",) + _OPTIONAL


def _sha(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(1 << 24)).hexdigest()[:16]
    except OSError:
        return None


def describe(ckpt_dir, tokenizer_path, **settings) -> Dict[str, object]:
    """What this rank is about to load: small, comparable across nodes."""
    ckpt_dir = Path(ckpt_dir)
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    about = {
        "params.json": _sha(ckpt_dir / "params.json"),
        "tokenizer": _sha(Path(tokenizer_path)),
        "shard sizes": {p.name: p.stat().st_size for p in shards if p.is_file()},
        **{name: _sha(ckpt_dir / name) for name in _OPTIONAL},
        **{k: str(v) for k, v in sorted(settings.items())},
    }
    return about


def _params(ckpt_dir) -> Optional[dict]:
    """params.json's values, to name the fields that differ (None if unreadable: its hash says it differs)."""
    try:
        return read_json_object(Path(ckpt_dir) / "params.json", missing="", fix="", max_bytes=1 << 16)
    except (OSError, ValueError):
        return None


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


_WHOLE_MODEL = "whole model"
_NO_DIGEST = ("a stage folder split by an older version, or a whole checkpoint without manifest.json; split the "
              "checkpoint again with utils/shard_model_checkpoint.py --pipeline_stages N and give each node its "
              "stage folder")


def explain(key: str, ref: dict, other: dict) -> str:
    """`key` and how it differs between the records `ref` and `other` (as
    check_same_checkpoint exchanges them): "params.json (rank 0 vs rank 2:
    n_layers 6 vs 8)"."""
    a, b = ref["about"].get(key), other["about"].get(key)
    ranks = f"rank {ref['who'][0]} vs rank {other['who'][0]}"
    if key == "params.json":
        pa, pb = ref.get("params"), other.get("params")
        if isinstance(pa, dict) and isinstance(pb, dict):
            fields = sorted(f for f in pa.keys() | pb.keys() if pa.get(f) != pb.get(f))
            if fields:
                shown = ", ".join(f"{f} {_show(pa.get(f))} vs {_show(pb.get(f))}" for f in fields[:6])
                return f"{key} ({ranks}: {shown}{', ...' if len(fields) > 6 else ''})"
            return f"{key} ({ranks}: the same values, written differently: copy one params.json to every node)"
    if isinstance(a, dict) and isinstance(b, dict):  # shard sizes: the files both have
        names = sorted(n for n in a.keys() & b.keys() if a[n] != b[n])
        shown = ", ".join(f"{n} {a[n]:,} vs {b[n]:,} bytes" for n in names[:4])
        return f"{key} ({ranks}: {shown}{', ...' if len(names) > 4 else ''})"
    if key == _WHOLE_MODEL:
        if a is None or b is None:
            lacking = ref if a is None else other
            return (f"{key} ({ranks}: digest {_show(a)[:8]} vs {_show(b)[:8]}; rank {lacking['who'][0]} has none: "
                    f"{_NO_DIGEST})")
        return (f"{key} ({ranks}: digest {a[:8]} vs {b[:8]}: their stages were split from different "
                "checkpoints)")
    if key == "stage_split":  # llama/weights/stages.py: how the layers were split into stages
        return (f"{key} ({ranks}: {_show(a)} vs {_show(b)}: the stages' layers do not join up; stage folders "
                "split by an older version hold the even split: split the whole checkpoint again with "
                "utils/shard_model_checkpoint.py --pipeline_stages N and give every node its new stage folder)")
    if key in _OPTIONAL or key in ("params.json", "tokenizer") or key.startswith("weights"):
        return f"{key} ({ranks}: hash {_show(a)[:8]} vs {_show(b)[:8]})"
    return f"{key} ({ranks}: {_show(a)} vs {_show(b)})"


def _node() -> str:
    return f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"


def differences(mine: Dict[str, object], theirs: Dict[str, object]) -> List[str]:
    """The keys whose values differ (optional files only if both ranks have them)."""
    out = []
    for key in mine.keys() | theirs.keys():
        a, b = mine.get(key), theirs.get(key)
        if key in _OPTIONAL and (a is None or b is None):
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # only the files both have
            a, b = ({k: v for k, v in d.items() if k in a.keys() & b.keys()} for d in (a, b))
        if a != b:
            out.append(key)
    return sorted(out)


def replicated_hash(state: dict, keep=lambda key: True) -> str:
    """A hash of the tensors every shard holds whole (the norms): the same on
    every rank of one checkpoint, whichever shard it reads. `keep`: which
    names count (a pipeline stage's)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(k for k in state if "norm" in k and keep(k)):
        t = state[key]
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_same_checkpoint(ckpt_dir, tokenizer_path, error: Optional[BaseException] = None,
                          extra: Optional[dict] = None, stage: int = 0, model: Optional[str] = None,
                          **settings) -> None:
    """Raises on every rank if any rank loads something else than rank 0, or
    met `error` preparing its load (that rank raises its own error, the others
    a ValueError naming it). `extra`: more facts to compare (a weights hash),
    like the files, only with the first rank of the same pipeline `stage`.
    `model`: the whole checkpoint's digest, compared across all ranks (give
    it with pipeline stages; None: this rank's folder has none)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    mine = record(ckpt_dir, tokenizer_path, dist.get_rank(), error, extra, stage, model, **settings)
    everyone: List[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if error is not None:
        raise error
    compare(everyone)


def record(ckpt_dir, tokenizer_path, rank: int, error: Optional[BaseException] = None, extra: Optional[dict] = None,
           stage: int = 0, model: Optional[str] = None, **settings) -> dict:
    """What one rank sends the others (check_same_checkpoint's arguments)."""
    about = {**describe(ckpt_dir, tokenizer_path, **settings), **(extra or {}), _WHOLE_MODEL: model}
    return {"who": (rank, _node(), str(ckpt_dir)), "about": about, "stage": stage, "params": _params(ckpt_dir),
            "per stage": _PER_STAGE + tuple(extra or ()), "error": None if error is None else str(error)}


def compare(everyone: List[dict]) -> None:
    """Raises the ValueError check_same_checkpoint raises for the records
    every rank sent (rank order); returns if they agree."""
    failed = [other for other in everyone if other["error"] is not None]
    if failed:
        rank, node, folder = failed[0]["who"]
        raise ValueError(f"rank {rank} on {node} cannot load its part of {folder}: {failed[0]['error']}"
                         + (f" ({len(failed) - 1} more ranks failed too)" if len(failed) > 1 else ""))
    first = everyone[0]
    problems = []
    for other in everyone[1:]:
        same_stage = next(o for o in everyone if o["stage"] == other["stage"])
        found = [explain(k, first, other) for k in differences(first["about"], other["about"])
                 if k not in other["per stage"]]
        found += [explain(k, same_stage, other) for k in differences(same_stage["about"], other["about"])
                  if k in other["per stage"]]
        if found:
            rank, node, folder = other["who"]
            problems.append(f"rank {rank} on {node} ({folder}) differs in {', '.join(found)}")
    if problems:
        rank0, node0, folder0 = first["who"]
        raise ValueError(
            f"the nodes do not load the same checkpoint: compared with rank {rank0} on {node0} ({folder0}), "
            + "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more ranks" if len(problems) > 4 else "")
            + ". Give every node the same checkpoint files, tokenizer and options."
        )
