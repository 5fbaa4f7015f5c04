"""What may be written where: the output, the report and the weights' data file must each be a
regular file or a new name (never a device, FIFO, directory or symlink), never a file the input
or a sibling model uses; temporaries carry their owner's host and PID so a later run removes
those of a killed one; the final renames restore what was there if one fails.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import shutil
import stat
from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import OutputError, UsageError
from rewriter.patterns.graph import initializers


def check_external_name(name: str, path: Path) -> None:
    """A data name is a plain file name, written beside the output `path`: a path (a separator,
    `..`, absolute) is a usage error, never resolved somewhere else; the output's own name is
    refused like every other file the run must not replace."""
    if not name or os.path.isabs(name) or Path(name).name != name or name in (".", ".."):   # ./x, x/, a/b
        raise UsageError(f"--external-data {name!r}: give a file name (it is written beside the output)")
    if name == path.name:
        raise OutputError(f"--external-data {name!r}: is the output model's own name; refusing to write its "
                          "weights over it (choose another name)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:   # a name from os.fsdecode of non-UTF-8 bytes
        raise UsageError(f"--external-data {name!r}: not UTF-8 (ONNX stores the name as UTF-8 text)") from exc


_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket"}


def check_target(path: Path, what: str) -> None:
    """Raise OutputError unless `path` is a new name or a regular file. Files are renamed into
    place: that would turn a device (/dev/null), a FIFO or a directory into a regular file, and
    replace a symlink while its target — the file the user meant — stays as it was. A symlink is
    written through only when the user names its target."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot check it ({exc.strerror or exc})") from exc
    if stat.S_ISLNK(mode):
        raise OutputError(f"{what} {path}: is a symbolic link; refusing to replace it (to write to its "
                          f"target, pass {os.path.realpath(path)})")
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
        raise OutputError(f"{what} {path}: is {kind}, not a regular file; refusing to replace it")


def check_not_a_model_file(path: Path, models, what: str) -> None:
    """Raise OutputError if `path` (a file a verb writes that is not a model: bench's --json and
    --plot, calibrate's -o) is one of `models` or an external data file of one — by name, through
    a symlink or as another hard link — or is no regular file (check_target)."""
    path = Path(path)
    check_target(path, what)
    for model in models:
        if model is None:
            continue
        for used in (Path(model), *map(Path, data_files_of(Path(model)))):
            if path.resolve() == used.resolve() or (path.exists() and used.exists() and os.path.samefile(path, used)):
                raise OutputError(f"{what} {path}: is {'the model' if used == Path(model) else 'a data file of'} "
                                  f"{model}; refusing to write over it")


# ExternalTensor.meta key: the location the model gave a tensor whose data file is read through a
# link (rewriter.io.read_through_links); its `location` is then the file's absolute path
GIVEN_LOCATION = "rewriter.given_location"


def given_location(tensor: ir.ExternalTensor) -> str:
    """The external data location as the model wrote it."""
    return tensor.meta.get(GIVEN_LOCATION, str(tensor.location))


def proto_tensors(graph: onnx.GraphProto):
    """Every TensorProto of `graph` and its subgraphs (initializers and tensor attributes)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from proto_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from proto_tensors(sub)


_LOCATION_ENTRY = b"\x0a\x08location"     # the serialized key of an external_data "location" entry
_SEARCH_BLOCK = 8 << 20


def mentions_external_data(model_path: Path) -> bool:
    """False when the file cannot reference external data (no "location" key in its bytes):
    a byte search, so that a large model with inline weights is not parsed for nothing. Read in
    blocks (not a memory map, whose pages would count as this process's memory)."""
    overlap = len(_LOCATION_ENTRY) - 1
    try:
        with open(model_path, "rb") as f:
            tail = b""
            while block := f.read(_SEARCH_BLOCK):
                if (tail + block).find(_LOCATION_ENTRY) >= 0:
                    return True
                tail = block[-overlap:]
    except OSError:
        pass
    return False


def data_files_of(model_path: Path) -> set[str]:
    """Resolved paths of the external data files the model at `model_path` references (its
    graph is parsed, no weight is read); nothing for a file that is not a model."""
    if not mentions_external_data(model_path):
        return set()
    try:
        proto = onnx.load(str(model_path), format="protobuf", load_external_data=False)
    except Exception:
        return set()
    return {str((model_path.parent / entry.value).resolve())
            for tensor in proto_tensors(proto.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


class Siblings:
    """Which other models reference a file as external data: the *.onnx files of its folder,
    scanned once per folder and only when a file we would replace exists. Replacing such a
    file breaks the other model (it reads the new bytes at its old offsets)."""

    def __init__(self, replaced: str):
        self.replaced = replaced        # the model being written: what it referenced is ours
        self.index: dict[str, dict[str, list[str]]] = {}

    def users(self, path: Path) -> list[str]:
        if not path.exists():
            return []
        folder = str(path.parent.resolve())
        if folder not in self.index:
            self.index[folder] = self._scan(Path(folder))
        return self.index[folder].get(str(path.resolve()), [])

    def _scan(self, folder: Path) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        try:
            models = sorted(p for p in folder.iterdir() if p.name.lower().endswith(".onnx") and p.is_file())
        except OSError:
            return users
        for model in models:
            if str(model.resolve()) != self.replaced:
                for data in data_files_of(model):
                    users.setdefault(data, []).append(model.name)
        return users


def _data_problem(target: Path, inputs: set[str], replacing_input: bool, siblings: Siblings) -> str | None:
    """Why the output's external data must not be written to `target`, or None."""
    if str(target.resolve()) in inputs and not replacing_input:
        return "is a file of the input model"
    users = siblings.users(target)
    if users:
        return f"is also the external data of {', '.join(users)}"
    return None


def _utf8_name(name: str) -> str:
    """`name` as ONNX can store it (UTF-8 text): bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(name).decode("utf-8", "replace")


def _default_data_names(model: ir.Model, path: Path, replacing_input: bool):
    """OUTPUT.data, first the input's own data file when it is replaced, then OUTPUT.1.data, ..."""
    first = []
    if replacing_input:
        locations = {given_location(v.const_value) for v in initializers(model)
                     if isinstance(v.const_value, ir.ExternalTensor)}
        if len(locations) == 1 and len(Path(next(iter(locations))).parts) == 1:
            first = list(locations)
    base = _utf8_name(path.name)
    yield from dict.fromkeys(first + [f"{base}.data"])
    for n in range(1, 1000):
        yield f"{base}.{n}.data"


def output_data_name(model: ir.Model, path: Path, requested, inputs: set[str], replacing_input: bool,
                     siblings: Siblings, inline_ok: bool) -> str | None:
    """The output's external data file name, or None to write the weights inline (`inline_ok`:
    the input had none and they fit protobuf's limit). A name the user gave is refused when it
    is unusable; the default moves on to the next free name rather than replace a file another
    model uses or one that is not a regular file."""
    if requested is not None:
        name = str(requested)
        check_external_name(name, path)
        target = path.parent / name
        check_target(target, "external data file")
        problem = _data_problem(target, inputs, replacing_input, siblings)
        if problem:
            raise OutputError(f"{target}: {problem}; refusing to write over it (choose another "
                              "--external-data name)")
        return name
    if inline_ok:
        return None
    for name in _default_data_names(model, path, replacing_input):
        target = path.parent / name
        try:
            check_target(target, "external data file")
        except OutputError:
            continue
        if _data_problem(target, inputs, replacing_input, siblings) is None:
            return name
    raise OutputError(f"{path}: no free name for its external data beside it (give --external-data)")


def check_also_written(also_writes: dict, inputs: set[str], written: set[str], siblings: Siblings) -> None:
    """Other files the caller writes after the model (the report) take none of the model's."""
    for what, other in also_writes.items():
        other = Path(other)
        check_target(other, what)
        key = str(other.resolve())
        if key in inputs:
            raise OutputError(f"{what} {other}: is a file of the input model; refusing to write over it")
        if key in written:
            raise OutputError(f"{what} {other}: is a file of the output model; refusing to write over it")
        users = siblings.users(other)
        if users:
            raise OutputError(f"{what} {other}: is the external data of {', '.join(users)}; refusing "
                              "to write over it")


# Temporary folders are named after this machine and the owning process, so that a later run
# can tell the leftovers of a killed one (SIGKILL, power loss: no cleanup ran) from those of a
# run still writing, here or on another machine sharing the folder.
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


_TEMPORARY = re.compile(r"\.flashnorm-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[a-z0-9_]+\.tmp")


def temp_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporary folders of process `pid` (default: this one) on this machine."""
    return f".flashnorm-{_HOST}-{os.getpid() if pid is None else pid}-"


def _alive(pid: int) -> bool:
    if os.name == "nt":         # os.kill(pid, 0) terminates the process on Windows: keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):     # another user's process (EPERM), or not a pid at all
        return True
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary folders that runs on this machine left in `folder` when they were
    killed: ours by name, and only those whose process is gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if (match and match["host"] == _HOST and entry.is_dir(follow_symlinks=False)
                and not _alive(int(match["pid"]))):
            shutil.rmtree(entry.path, ignore_errors=True)


def temporary_model_name(external_data: str | None) -> str:
    """The model's name inside the temporary folder: ASCII, so that onnx.checker and
    onnxruntime (which take str paths as UTF-8) read it whatever the output is called."""
    return "model.onnx" if external_data != "model.onnx" else "graph.onnx"


def commit(moves: list[tuple[Path, Path]], tmp: Path) -> None:
    """Rename each (new, target) into place, in order. A target that existed is kept as a
    hard link in `tmp` until all renames are done, so that a failure restores it."""
    done: list[tuple[Path, bool, Path | None]] = []
    try:
        for i, (new, target) in enumerate(moves):
            existed, backup = target.exists(), None
            if existed:
                backup = tmp / f".backup{i}"
                try:
                    os.link(target, backup)
                except OSError:
                    backup = None       # no hard links here: this one cannot be restored
            os.replace(new, target)
            done.append((target, existed, backup))
    except BaseException:
        for target, existed, backup in reversed(done):
            try:
                if backup is not None:
                    os.replace(backup, target)
                elif not existed:
                    os.unlink(target)
            except OSError:
                pass
        raise
