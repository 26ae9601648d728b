"""manifest.json: what a checkpoint writer of this project put in a folder.

An md5 of every file (checklist.chk) takes minutes for 140 GB, so it is not
checked at load. The manifest is the cheap check: each shard's size and a
fingerprint of its first and last MiB, which tells apart the shards of two
different checkpoints of the same shape. (params.json and the tokenizer are
not listed: the loader checks them against the weights' shapes, and they stay
editable by hand.) The writer replaces it twice: with
`"complete": false` before it renames anything into place, and with the
final list after the last rename. So a folder whose write was interrupted (a
kill between the renames of a `--force` overwrite) says so, and a folder
holding files from two writes names the files that disagree. No torch.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from ..common.jsonfile import read_json_object

NAME = "manifest.json"
VERSION = 1
_EDGE = 1 << 20  # bytes hashed at each end of a file


class ManifestError(ValueError):
    """The files of a checkpoint folder are not the ones its writer wrote together."""


def fingerprint(path: Path) -> str:
    """sha256 over the size, the first MiB and the last MiB of a file: a few ms for any size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode() + b"\0")
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def manifest_text(files: Dict[str, dict], complete: bool) -> str:
    return json.dumps({"version": VERSION, "complete": complete, "files": files}, indent=1) + "\n"


def read_manifest(folder: Path):
    """The manifest dict of `folder`, or None if it has none (Meta's downloads)."""
    path = folder / NAME
    if not os.path.lexists(path):
        return None
    fix = f"delete {path} if you trust the other files"
    data = read_json_object(path, missing=fix, fix=fix, error=ManifestError)
    files = data.get("files")
    if (data.get("version") != VERSION or not isinstance(data.get("complete"), bool) or not isinstance(files, dict)
            or not all(isinstance(v, dict) and type(v.get("size")) is int and v["size"] >= 0
                       and isinstance(v.get("fingerprint"), str)
                       for v in files.values())):
        raise ManifestError(f"{path} is not a manifest this version writes; delete it if you trust the other files")
    return data


def check_folder(folder: Path, shard_names: List[str], needed: Optional[List[str]] = None) -> None:
    """Refuses a folder whose files are not the ones its manifest lists, naming them.

    `needed`: the shards that must be present (default all; a node of a
    multi-node run may hold only its own ranks' shards)."""
    data = read_manifest(folder)
    if data is None:
        return
    if not data["complete"]:
        raise ManifestError(
            f"{folder}: a write into this folder was interrupted (its {NAME} says the write never finished), so "
            "its files may come from two different checkpoints; run the conversion or split again (with --force)"
        )
    files = data["files"]
    problems, missing = [], []
    for name, want in files.items():
        if "/" in name or name.startswith("."):
            problems.append(f"{name!r} is not a plain file name")
            continue
        path = folder / name
        if not path.is_file():
            if needed is None or name in needed:
                missing.append(name)
        elif path.stat().st_size != want["size"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, the writer wrote {want['size']:,}")
        elif fingerprint(path) != want["fingerprint"]:
            problems.append(f"{name} has other contents than the writer wrote")
    problems += [f"{n} is not one of the files written together" for n in shard_names if n not in files]
    if missing and not problems:
        raise ManifestError(f"{folder} lacks {len(missing)} of the {len(files)} shards its writer wrote "
                            f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); copy them into it")
    problems += [f"{n} is missing" for n in missing]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ManifestError(
            f"{folder} mixes files of different checkpoints: {shown}. Copy the folder again from one source (or "
            f"write it again); if you changed a file on purpose, delete {folder / NAME}"
        )
