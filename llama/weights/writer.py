"""Writing Meta-format checkpoint directories safely.

Every file is written under a temporary name and renamed only when all of
them are complete, so a crash or a full disk never leaves a directory that
looks like a finished checkpoint. Temporary files are created exclusively
(mkstemp: random names, O_EXCL, never through a symbolic link someone planted)
in the output folder, and given the permissions the user's umask asks for
(0644 under umask 022, 0640 under 027) just before they are renamed: mkstemp
makes them 0600, which would leave a shared checkpoint folder unreadable to
the group. A `checklist.chk` (md5) lists the files, and `manifest.json`
(llama/weights/manifest.py), written first as "incomplete" and last as
complete, lets the loader refuse a folder left mixed by an interrupted
overwrite.

Outputs are compared with inputs by file identity (device and inode,
os.path.samefile), never by path strings: a bind mount, a symbolic link or a
hard link of the input is the input. An output that is an input folder,
contains one or lies inside one is refused before anything is read or
written, `--force` or not.

Weights are never stored twice: tensors that are views of one storage are
copied once, and an output.weight equal to tok_embeddings.weight (tied
embeddings) is saved as that same tensor, which torch.save writes once.
"""

import dataclasses
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from . import manifest
from . import stages
from .args import ModelArgs
from .checkpoint import (CheckpointError, check_world_size, checked_rank_state, embeddings_tied, find_shards,
                         inspect_checkpoint, weights_vocab_size)
from ..common.files import shard_name, sidecar_path
from .progress import Progress


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint was written; nothing was published."""


class _HashingWriter:
    """A write-only file wrapper that computes the md5 of what passes through
    and reports the bytes written to a Progress."""

    def __init__(self, f, progress: Progress):
        self.f, self.md5, self.progress = f, hashlib.md5(), progress

    def write(self, data) -> int:
        self.md5.update(data)
        self.progress.update(nbytes=len(memoryview(data).cast("B")))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _md5_of(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    return md5.hexdigest()


def _for_saving(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` as torch.save should see it: tied embeddings as one tensor, and
    views of bigger storages copied (torch.save writes a view's whole
    storage), once for names that are the same view, so they stay shared."""
    if embeddings_tied(state):
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    copies: Dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if v.is_contiguous() and v.untyped_storage().nbytes() == v.nbytes:
            out[k] = v
            continue
        view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if view not in copies:
            copies[view] = v.clone(memory_format=torch.contiguous_format)
        out[k] = copies[view]
    return out


class StreamedShard:
    """A shard write_checkpoint writes tensor by tensor, never holding it whole:
    `spec` maps each name to a tensor of its dtype and shape whose memory is
    never touched (torch.empty), `fill(out)` writes every tensor of `out`
    (the same names, memory-mapped from the file being written) and yields
    the bytes done after each. torch.save lays the file out with holes for
    the bytes (torch.serialization.skip_data), the holes are allocated, and
    `fill` writes through a shared mapping: a file torch.load reads like any
    other, written with about one tensor in memory."""

    def __init__(self, spec: Dict[str, torch.Tensor], fill: Callable[[Dict[str, torch.Tensor]], Iterable[int]]):
        self.spec, self.fill = spec, fill

    def __len__(self) -> int:
        return len(self.spec)


def _read_umask() -> int:
    """The process's umask, read without changing it (Linux's /proc/self/status);
    elsewhere set and restored once, at the first call."""
    global _UMASK
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: Optional[int] = None


def new_file_mode() -> int:
    """The permissions open() would give a new file now: 0o666 less the umask
    (mkstemp's files are 0600 whatever the umask)."""
    return 0o666 & ~_read_umask()


_OUR_TEMP = re.compile(r"\.(consolidated\.\d+\.pth|params\.json|tokenizer\.model(\.json)?|checklist\.chk|"
                       r"manifest\.json|pipeline\.json|\.incomplete)\.\w{8}\.tmp")


class _TempFiles:
    """Temporary files in one folder, created exclusively, renamed or removed together."""

    def __init__(self, folder: Path):
        self.folder, self.paths, self.mode = folder, {}, new_file_mode()

    def open(self, name: str):
        """A new binary file object for the future `name`; mkstemp uses O_CREAT|O_EXCL and a random name."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
        self.paths[name] = Path(tmp)
        return os.fdopen(fd, "wb")

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def copy(self, name: str, src: Path) -> None:
        with open(src, "rb") as fsrc, self.open(name) as f:
            shutil.copyfileobj(fsrc, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())

    def save_tensors(self, name: str, state: Dict[str, torch.Tensor], progress: Progress) -> str:
        """torch.save, fsync'ed; returns the file's md5, computed while writing."""
        with self.open(name) as f:
            hashed = _HashingWriter(f, progress)
            torch.save(_for_saving(state), hashed)
            f.flush()
            os.fsync(f.fileno())
        return hashed.md5.hexdigest()

    def save_streamed(self, name: str, shard: "StreamedShard", progress: Progress) -> str:
        """A shard written tensor by tensor (see StreamedShard); returns its md5."""
        with self.open(name) as f:
            pass  # created exclusively; torch.save writes it by name below
        path = self.paths[name]
        with torch.serialization.skip_data():  # the layout and the pickle; the tensors' bytes left as holes
            torch.save(shard.spec, path)
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)  # a full disk fails here, not as SIGBUS
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # writes go to the file
            out = torch.load(path, mmap=True, weights_only=True)
        for nbytes in shard.fill(out):
            progress.update(nbytes=nbytes)
        del out
        with open(path, "r+b") as f:
            os.fsync(f.fileno())
        return _md5_of(path)

    def publish(self, name: str, as_name: Optional[str] = None) -> None:
        tmp = self.paths.pop(name)
        os.chmod(tmp, self.mode)  # complete: readable as the umask allows, like any file the user writes
        os.replace(tmp, self.folder / (as_name or name))  # replaces a planted link, never writes through it

    def remove_all(self) -> None:
        for tmp in self.paths.values():
            tmp.unlink(missing_ok=True)
        self.paths.clear()


def _disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT, also when torch.save wrapped it in a RuntimeError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _same_file(a, b) -> bool:
    """Whether `a` and `b` are one file or folder (device and inode); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _folders_above(path) -> List[Path]:
    """The folders above `path` (resolved: links followed, ".." applied), nearest first."""
    return list(Path(path).resolve().parents)


def input_overlap(out, inp) -> Optional[str]:
    """How writing to `out` would meet the input `inp`, compared by file
    identity so that links and bind mounts cannot hide it: "is" (the same file
    or folder), "contains" (`inp` is inside the folder `out`), "is inside"
    (`out` is inside the folder `inp`), or None."""
    if _same_file(out, inp):
        return "is"
    if Path(inp).is_dir():
        if any(_same_file(out, above) for above in _folders_above(inp)):
            return "contains"
        if any(_same_file(inp, above) for above in _folders_above(out)):
            return "is inside"
    return None


def check_output_dir(out_dir, force: bool, protect: Iterable[Path] = ()) -> None:
    """Refuses `out_dir` if it is, contains or lies inside one of the inputs
    `protect` (by file identity: a bind mount or a link of the input counts,
    `force` or not), or if it holds files (unless `force`), without touching
    anything: tools call it before any slow work."""
    out_dir = Path(out_dir)
    for p in protect:
        overlap = input_overlap(out_dir, p)
        what = "input directory" if Path(p).is_dir() else "input file"
        if overlap == "is":
            raise ValueError(f"output directory {out_dir} is the {what} {p} (the same folder on disk, through a "
                             "link or a bind mount); writing there would replace the input: choose another output")
        if overlap == "contains":
            raise ValueError(f"output directory {out_dir} contains the {what} {p}; writing there could replace or "
                             "remove the input's files: choose an output outside it")
        if overlap == "is inside":
            raise ValueError(f"output directory {out_dir} is inside the {what} {p}; the input would change under "
                             "it: choose an output outside the input")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"output directory {out_dir} is not empty; choose an empty one or pass --force to overwrite")


def check_output_file(out_path, protect: Iterable[Path] = ()) -> None:
    """Refuses a single output file that is a folder or one of the input files
    `protect` (by file identity: a hard link, a symbolic link or a bind mount
    of an input counts)."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"output {out_path} is a directory; give the path of the file to write")
    for p in protect:
        if _same_file(out_path, p):
            raise ValueError(f"output {out_path} is the input file {p} (the same file on disk); writing there "
                             "would replace the input: choose another output")


def prepare_output_dir(out_dir: Path, force: bool, protect: Iterable[Path] = ()) -> None:
    """check_output_dir, then creates `out_dir`."""
    check_output_dir(out_dir, force, protect)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_checkpoint(
    out_dir,
    params: dict,
    shards: Iterable[Dict[str, torch.Tensor]],
    tokenizer_path: Optional[Path] = None,
    force: bool = False,
    protect: Iterable[Path] = (),
    progress: Callable[[str], None] = lambda msg: None,
    n_shards: int = 1,
    show_progress: bool = False,
    extra_files: Optional[Dict[str, str]] = None,
) -> Path:
    """Writes params.json, consolidated.NN.pth (one per item of `shards`,
    consumed one at a time so only one is in memory; a StreamedShard is
    written a tensor at a time), tokenizer.model (with
    its tokenizer.model.json sidecar, if it has one), checklist.chk and
    manifest.json into `out_dir`.

    `show_progress` draws shards written, MB and MB/s on stderr (`n_shards`
    is the total it shows). `extra_files`: name -> text of small files
    written with the others (a stage folder's pipeline.json).

    Raises DiskFullError (a ValueError) if the disk fills up; then, as on any
    other failure, nothing new is published and the folder is as before.
    """
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, force, protect)
    md5s: Dict[str, str] = {}
    tmp = _TempFiles(out_dir)
    bar = Progress(f"writing {out_dir}", n_shards, "shards", sys.stderr if show_progress else None)
    try:
        for i, state in enumerate(shards):
            name = shard_name(i)
            md5s[name] = (tmp.save_streamed(name, state, bar) if isinstance(state, StreamedShard)
                          else tmp.save_tensors(name, state, bar))
            bar.update(items=1)
            progress(f"wrote {out_dir / name} ({len(state)} tensors)")
            del state
        bar.close()
        _write_small_files(tmp, md5s, params, tokenizer_path, extra_files or {})
        checklist = "".join(f"{md5s[name]}  {name}\n" for name in sorted(md5s))
        tmp.write_bytes("checklist.chk", checklist.encode())
        # The shards only: params.json and the tokenizer are checked against the
        # weights' shapes at load, and stay editable by hand.
        files = {name: {"size": p.stat().st_size, "fingerprint": manifest.fingerprint(p)}
                 for name, p in tmp.paths.items() if name.endswith(".pth")}
        tmp.write_bytes(manifest.NAME, manifest.manifest_text(files, complete=True).encode())
        # From here on the folder changes: first say so, so that a kill between
        # the renames below leaves a folder the loader refuses, not a mix.
        tmp.write_bytes(".incomplete", manifest.manifest_text(files, complete=False).encode())
        tmp.publish(".incomplete", as_name=manifest.NAME)
    except BaseException as e:
        tmp.remove_all()
        if _disk_full(e):
            free = shutil.disk_usage(out_dir).free
            raise DiskFullError(
                f"the disk holding {out_dir} is full ({free:,} bytes free) while writing the checkpoint; "
                "nothing was published and no partial file was left: free some space or choose another output"
            ) from e
        raise
    _publish(out_dir, tmp, md5s)
    return out_dir


def _write_small_files(tmp: "_TempFiles", md5s: Dict[str, str], params: dict, tokenizer_path: Optional[Path],
                       extra_files: Dict[str, str]) -> None:
    """params.json, the tokenizer (with its sidecar) and `extra_files`, under temporary names, md5s recorded."""
    for name, text in extra_files.items():
        tmp.write_bytes(name, text.encode())
        md5s[name] = hashlib.md5(text.encode()).hexdigest()
    params_bytes = (json.dumps(params, indent=2) + "\n").encode()
    tmp.write_bytes("params.json", params_bytes)
    md5s["params.json"] = hashlib.md5(params_bytes).hexdigest()
    if tokenizer_path is not None:
        # A BPE tokenizer.model is read together with its sidecar: copy both.
        sources = {"tokenizer.model": Path(tokenizer_path), "tokenizer.model.json": sidecar_path(tokenizer_path)}
        for name, src in sources.items():
            if name == "tokenizer.model" or src.is_file():
                tmp.copy(name, src)
                md5s[name] = _md5_of(tmp.paths[name])


def _publish(out_dir: Path, tmp: "_TempFiles", md5s: Dict[str, str]) -> None:
    """Every file is complete under its temporary name: drop the shards a previous
    (forced-over) run left, and its tokenizer sidecar if the new tokenizer has
    none, then rename each file into place, the manifest last."""
    stale = [p for p in out_dir.glob("consolidated.*.pth") if p.name not in md5s]
    if "tokenizer.model" in md5s and "tokenizer.model.json" not in md5s:
        stale.append(out_dir / "tokenizer.model.json")
    for path in stale:
        path.unlink(missing_ok=True)
    for name in [n for n in tmp.paths if n != manifest.NAME]:
        tmp.publish(name)
    tmp.publish(manifest.NAME)  # last: the folder is complete
    for left in out_dir.iterdir():  # temporary files of an earlier, killed run
        if _OUR_TEMP.fullmatch(left.name):
            left.unlink(missing_ok=True)


def reshard_checkpoint(in_dir, out_dir, n_shards: int, tokenizer_path: Optional[Path] = None, force: bool = False,
                       progress: Callable[[str], None] = print, show_progress: bool = False,
                       pipeline_stages: int = 1) -> Path:
    """Splits or merges a Meta checkpoint into `n_shards` files.

    Works one output shard at a time from memory-mapped inputs, so peak
    memory is about one output shard, not the whole model. params.json is
    copied as is; tokenizer.model is copied from `tokenizer_path`, or from the
    input directory if it has one (Llama 3). With `pipeline_stages` P > 1, it
    writes P stage folders stage0/ .. (llama/weights/stages.py), each with
    `n_shards` files of only that stage's layers; each folder is written
    atomically, one after the other.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"input checkpoint directory {in_dir} not found")
    for name, value in (("the number of shards", n_shards), ("the number of pipeline stages", pipeline_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if (in_dir / stages.NAME).is_file() or stages.stage_folders(in_dir):
        raise ValueError(f"{in_dir} is split into pipeline stages already; pass a whole checkpoint as the input")
    check_output_dir(out_dir, force, protect=[in_dir])
    file_args = ModelArgs.from_json(in_dir / "params.json")  # validates; errors name the file
    # Llama 2 files say vocab_size -1; the weights know the real size.
    args = dataclasses.replace(file_args, vocab_size=weights_vocab_size(find_shards(in_dir)))
    paths, layout = inspect_checkpoint(in_dir, args, file_args.vocab_size)
    check_world_size(args, n_shards, f"splitting into {n_shards} shards")
    if tokenizer_path is None and (in_dir / "tokenizer.model").is_file():
        tokenizer_path = in_dir / "tokenizer.model"
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer_path} not found")
    params = json.loads((in_dir / "params.json").read_text())
    if pipeline_stages > 1:
        stages.stage_layers(args, pipeline_stages, 0)  # too few layers: said before writing
        # Every stage records the whole input's digest: nodes holding different
        # stages compare it at start-up (llama/parallel/fingerprint.py).
        model = stages.checkpoint_digest(params, {p.name: (p.stat().st_size, manifest.fingerprint(p)) for p in paths})
        for stage in range(pipeline_stages):
            layers = stages.stage_layers(args, pipeline_stages, stage)
            folder = out_dir / stages.stage_dir_name(stage)
            progress(f"{in_dir}: {len(paths)} shard(s) -> {folder}: layers {layers.start}..{layers.stop - 1}, "
                     f"{n_shards} shard(s)")
            shards = (checked_rank_state(paths, args, rank, n_shards, layout, layers) for rank in range(n_shards))
            write_checkpoint(folder, params, shards, tokenizer_path=tokenizer_path, force=force, protect=[in_dir],
                             progress=progress, n_shards=n_shards, show_progress=show_progress,
                             extra_files={stages.NAME: stages.stage_record(
                                 stage, pipeline_stages, args, n_shards, model)})
        return out_dir
    progress(f"{in_dir}: {len(paths)} shard(s) -> {out_dir}: {n_shards} shard(s)")
    # A fresh memory map per output shard: pages read for one shard are released before the next.
    shards = (checked_rank_state(paths, args, rank, n_shards, layout) for rank in range(n_shards))
    return write_checkpoint(out_dir, params, shards, tokenizer_path=tokenizer_path, force=force,
                            protect=[in_dir], progress=progress, n_shards=n_shards, show_progress=show_progress)
