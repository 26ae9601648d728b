"""Every node must load the same checkpoint with the same settings.

Each rank describes what it is about to load in a few hundred bytes (hashes
of params.json, the tokenizer, manifest.json and checklist.chk; the shard
file sizes; dtype and the runtime limits) and all ranks exchange these at
build time. A node whose folder holds another checkpoint would otherwise load
and generate garbage, or fail later in a collective with a raw error; here
every rank stops at once with a message naming the node and what differs.
Costs milliseconds: nothing is read but the small files.
"""

import hashlib
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional

# Files that not every copy of a checkpoint has (a folder copied by hand may
# lack the checklist): compared only between ranks that have them.
_OPTIONAL = ("manifest.json", "checklist.chk")


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
        "shard sizes": [(p.name, p.stat().st_size) for p in shards if p.is_file()],
        **{name: _sha(ckpt_dir / name) for name in _OPTIONAL},
        **{k: str(v) for k, v in sorted(settings.items())},
    }
    return about


def _node() -> str:
    return f"node {os.environ.get('GROUP_RANK', '?')} ({socket.gethostname()})"


def differences(mine: Dict[str, object], theirs: Dict[str, object]) -> List[str]:
    """The keys whose values differ (optional files only if both ranks have them)."""
    out = []
    for key in mine.keys() | theirs.keys():
        a, b = mine.get(key), theirs.get(key)
        if key in _OPTIONAL and (a is None or b is None):
            continue
        if a != b:
            out.append(key)
    return sorted(out)


def check_same_checkpoint(ckpt_dir, tokenizer_path, **settings) -> None:
    """Raises ValueError on every rank if any rank loads something else than rank 0."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = {"who": (dist.get_rank(), _node(), str(ckpt_dir)), "about": describe(ckpt_dir, tokenizer_path, **settings)}
    everyone: List[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first = everyone[0]
    problems = []
    for other in everyone[1:]:
        keys = differences(first["about"], other["about"])
        if keys:
            rank, node, folder = other["who"]
            problems.append(f"rank {rank} on {node} ({folder}) differs in {', '.join(keys)}")
    if problems:
        rank0, node0, folder0 = first["who"]
        raise ValueError(
            f"the nodes do not load the same checkpoint: compared with rank {rank0} on {node0} ({folder0}), "
            + "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more ranks" if len(problems) > 4 else "")
            + ". Give every node the same checkpoint files, tokenizer and options."
        )
