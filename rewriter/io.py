"""Load from and save to every form a user hands us; validate; save atomically.

Inputs: a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon `Graph`.
Weights in external data stay memory-mapped until a rule reads them; every layout exporters
produce loads (one file for all tensors, one file per tensor, `model.data`,
optimum's `model.onnx_data`).

Validation (`check_graph`) runs on a *skeleton* of the model: the graph with every large or
external initializer replaced by a typed graph input, so that onnx.checker and strict shape
inference see the structure and the types without a byte of weight being read or copied.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, InternalError, OutputError, Unsupported, UsageError

PROTOBUF_LIMIT = 2**31 - 2**26      # leave headroom under protobuf's 2 GiB message limit
KNOWN_DOMAINS = {"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "pkg.onnxscript.torch_lib",
                 "pkg.onnxscript.torch_lib.common", "pkg.torch.onnx", "ai.onnx.preview.training"}
MAX_ONNX_OPSET = onnx.defs.onnx_opset_version()
# ops onnxruntime registers in the ONNX domain although the ONNX standard has no such op (at
# that opset): the checker would call them unknown, so they are checked as contrib ops
ORT_ONNX_DOMAIN_CONTRIB = {"SimplifiedLayerNormalization": 10**9, "LayerNormalization": 17}  # op: first ONNX opset that has it
SKELETON_MIN_BYTES = 1024           # initializers above this size become typed inputs
INPUT_FILES = "rewriter.input_files"  # model.meta key: files the loaded model came from


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """One line out of a (multi-line, C++) exception message."""
    text = " ".join(str(exc).split())
    text = text.replace("==> Context: ", "").strip()
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return "path"
    if isinstance(source, onnx.ModelProto):
        return "proto"
    if isinstance(source, ir.Model):
        return "ir"
    if type(source).__name__ == "Graph" and type(source).__module__.startswith("onnx_graphsurgeon"):
        return "graphsurgeon"
    raise TypeError(f"cannot rewrite a {type(source).__name__}: pass a path, onnx.ModelProto, "
                    "onnx_ir.Model or onnx_graphsurgeon.Graph")


def load(source) -> tuple[ir.Model, str]:
    """(model, kind of `source`). A ModelProto or graphsurgeon graph is converted, never changed.

    Raises BadInput (not ONNX, truncated, missing external data) or Unsupported (unknown
    opset or domain, invalid graph) before anything is rewritten."""
    kind = _kind(source)
    if kind == "path":
        model = load_path(Path(source))
    elif kind == "proto":
        model = _deserialize(source, "model")
    elif kind == "ir":
        model = source
    else:
        import onnx_graphsurgeon as gs
        try:
            proto = gs.export_onnx(source)
        except Exception as exc:
            raise Unsupported(f"invalid graph: graphsurgeon export failed ({_first_line(exc)})") from exc
        model = _deserialize(proto, "model")
    check_supported(model)
    check_graph(model)
    return model, kind


def _deserialize(proto: onnx.ModelProto, what) -> ir.Model:
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise BadInput(f"{what}: not an ONNX model (no graph or no ir_version)")
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:    # a parsable protobuf whose content is not a valid model
        root, seen = exc, set()     # onnx_ir wraps the real complaint in SerdeErrors: the
        while id(root) not in seen:    # deepest exception of the chain says what is wrong
            seen.add(id(root))
            inner = root.__cause__ or root.__context__
            if inner is None:
                break
            root = inner
        raise Unsupported(f"{what}: invalid model ({type(root).__name__}: {_first_line(root)})") from exc


def load_path(path: Path) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir() or path.stat().st_size == 0:
        raise BadInput(f"{path}: not an ONNX model (empty file or a directory)")
    try:
        # protobuf, whatever the extension: onnx would guess a text format from `.json`/`.txt`
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:   # protobuf raises DecodeError and friends: all mean "not ONNX"
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(exc).__name__}: "
                       f"{_first_line(exc, 120)})") from exc
    model = _deserialize(proto, path)
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    try:
        files = check_external_data(model, path.parent)
    except BadInput as exc:
        raise BadInput(f"{path}: {exc}") from exc
    _read_through_links(model)
    model.meta[INPUT_FILES] = [str(path.resolve())] + sorted(files)
    return model


def _initializers(model: ir.Model):
    for graph in model.graphs():
        yield from graph.initializers.values()


class _InputExternalTensor(ir.ExternalTensor):
    """An external tensor of the model the user handed us, readable through symlinks and hard
    links. onnx_ir refuses, when the weight is first read, a data file whose real path leaves
    the model's folder or that has several hard links (a defence for servers loading untrusted
    models); the Hugging Face cache is exactly that (snapshots/<rev>/model.onnx.data ->
    ../../blobs/<sha>), and a hard link is an ordinary way to share weights. The location
    itself was checked at load (relative, no '..'): the file read is the one the folder names."""

    __slots__ = ()

    def _check_path_containment(self) -> None:
        return None


def _read_through_links(model: ir.Model) -> None:
    for value in _initializers(model):
        tensor = value.const_value
        if type(tensor) is ir.ExternalTensor:
            value.const_value = _InputExternalTensor(
                tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                name=tensor.name, doc_string=tensor.doc_string, metadata_props=tensor.metadata_props,
                base_dir=tensor.base_dir)


def _readable(path: Path) -> str | None:
    """None when `path` opens for reading, else why not (stat alone does not say)."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _external_location(tensor: ir.ExternalTensor, base: Path, name: str) -> Path:
    location = str(tensor.location)
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise BadInput(f"external data location {location!r} of tensor {name!r} is not a relative "
                       "path inside the model's folder")
    return Path(tensor.base_dir or base) / location


def check_external_data(model: ir.Model, base: Path) -> set[str]:
    """Every external tensor's file exists, opens for reading and is long enough (reads nothing).
    Returns the resolved paths of the external data files."""
    sizes: dict[str, int] = {}
    unreadable: dict[str, str | None] = {}
    for value in _initializers(model):
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = _external_location(tensor, base, value.name)
        key = str(location.resolve())
        if key not in sizes:
            sizes[key] = location.stat().st_size if location.is_file() else -1
        if sizes[key] < 0:
            raise BadInput(f"external data file {tensor.location!r} of tensor {value.name!r} is missing")
        if key not in unreadable:
            unreadable[key] = _readable(location)
        if unreadable[key]:
            raise BadInput(f"external data file {tensor.location!r} cannot be read ({unreadable[key]})")
        offset, length = tensor.offset or 0, tensor.length
        if offset < 0 or (length is not None and length < 0):
            raise BadInput(f"external data of tensor {value.name!r} has a negative offset or length")
        try:
            nbytes = tensor.nbytes
        except Exception:       # an unknown dtype: the checker will say
            nbytes = 0
        if length is not None and length < nbytes:
            raise BadInput(f"external data of tensor {value.name!r} is shorter than its shape needs "
                           f"({length} < {nbytes} bytes)")
        end = offset + (length if length is not None else nbytes)
        if sizes[key] < end:
            raise BadInput(f"external data file {tensor.location!r} is shorter than tensor "
                           f"{value.name!r} needs ({sizes[key]} < {end} bytes)")
    return set(sizes)


def check_supported(model: ir.Model) -> None:
    imports = model.graph.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        raise Unsupported("model imports no default ONNX opset")
    if version > MAX_ONNX_OPSET:
        raise Unsupported(f"opset {version} is newer than this onnx supports ({MAX_ONNX_OPSET})")
    if version < 1:
        raise Unsupported(f"invalid default opset version {version}")
    local = {domain for domain, _, _ in model.functions}
    for node in model.graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise Unsupported(f"node {node.name!r} uses unknown domain {node.domain!r}")


# -- validation ---------------------------------------------------------------------------------

def check_dangling(model: ir.Model) -> None:
    """Every node input is produced by a node, an initializer or a graph input (any scope)."""
    for node in model.graph.all_nodes():
        for value in node.inputs:
            if value is None or value.producer() is not None:
                continue
            if value.is_graph_input() or value.is_initializer() or value.graph is not None:
                continue
            raise Unsupported(f"invalid graph: input {value.name!r} of node {node.name!r} "
                              f"({node.op_type}) is produced by no node, initializer or graph input")


def _is_sorted(graph: ir.Graph) -> bool:
    seen: set[int] = set()
    for node in graph:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is graph and id(producer) not in seen:
                return False
        seen.add(id(node))
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH and not _is_sorted(attr.value):
                return False
            if attr.type == ir.AttributeType.GRAPHS and not all(_is_sorted(g) for g in attr.value):
                return False
    return True


def check_order(model: ir.Model) -> None:
    """Raise Unsupported on a cycle. An acyclic graph whose nodes are out of order (ONNX
    requires topological order; some tools do not keep it) is sorted, nothing else moves."""
    if _is_sorted(model.graph):
        return
    try:
        model.graph.sort()
    except ValueError as exc:
        raise Unsupported("invalid graph: it contains a cycle (no topological order exists)") from exc


def _tensors(model: ir.Model):
    """(owner name, tensor) for every initializer and Constant/attribute tensor, all graphs."""
    for value in _initializers(model):
        if value.const_value is not None:
            yield value.name, value.const_value
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                yield f"{node.name}.{attr.name}", attr.value


def check_tensors(model: ir.Model) -> None:
    """Tensor data matches its dtype and shape (neither checker nor shape inference look):
    raw bytes are compared by length only; small typed-field tensors are decoded."""
    for name, tensor in _tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            continue
        proto = getattr(tensor, "raw", None)
        try:
            if isinstance(proto, onnx.TensorProto) and proto.HasField("raw_data") \
                    and tensor.dtype != ir.DataType.STRING:
                if len(proto.raw_data) != tensor.nbytes:
                    raise ValueError(f"{len(proto.raw_data)} bytes of data, {tensor.dtype.name} "
                                     f"{list(tensor.shape)} needs {tensor.nbytes}")
            elif isinstance(proto, onnx.TensorProto) and tensor.size <= 1 << 16:
                tensor.numpy()
        except Exception as exc:
            raise Unsupported(f"invalid tensor {name!r}: data does not match its type and shape "
                              f"({_first_line(exc, 160)})") from exc


def skeleton(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto with every external or large initializer turned into a typed
    main-graph input: no weight is read or copied, checker and shape inference still see
    every type and shape. Small initializers (axes, shapes, epsilons) stay as they are."""
    swapped: list[tuple[ir.Value, object]] = []
    try:
        for value in _initializers(model):
            tensor = value.const_value
            if tensor is None:
                continue
            if isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > SKELETON_MIN_BYTES:
                stub = ir.ExternalTensor("__skeleton__", 0, 0, tensor.dtype, shape=tensor.shape,
                                         name=value.name)
                swapped.append((value, tensor))
                value.const_value = stub
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    graph_inputs = {i.name for i in proto.graph.input}
    moved: list[onnx.ValueInfoProto] = []

    def strip(graph: onnx.GraphProto) -> None:
        keep = []
        for init in graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                if init.name not in graph_inputs:
                    graph_inputs.add(init.name)
                    moved.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                                    list(init.dims)))
            else:
                keep.append(init)
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        strip(sub)

    strip(proto.graph)
    proto.graph.input.extend(moved)
    # ORT's contrib ops in the ONNX domain: check them as the contrib ops they are
    default = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    contrib = False
    for node in proto.graph.node:
        since = ORT_ONNX_DOMAIN_CONTRIB.get(node.op_type)
        if node.domain in ("", "ai.onnx") and since is not None and default < since:
            node.domain, contrib = "com.microsoft", True
    if contrib and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


def check_proto(proto: onnx.ModelProto) -> None:
    """onnx.checker (structure, topological order, schemas) then strict shape inference
    (types and shapes consistent with every declared value_info; unknown ops are skipped)."""
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise Unsupported(f"invalid graph: {_first_line(exc)}") from exc
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:
        raise Unsupported(f"invalid graph (shape inference): {_first_line(exc)}") from exc


def check_graph(model: ir.Model) -> None:
    """Raise Unsupported when the graph is invalid: a dangling input, a cycle, a node that
    fails its schema, types or shapes that contradict each other."""
    check_dangling(model)
    check_order(model)
    check_tensors(model)
    try:
        proto = skeleton(model)
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"invalid graph: cannot serialize ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from exc
    check_proto(proto)


def to_kind(model: ir.Model, kind: str):
    if kind == "ir" or kind == "path":
        return model
    proto = ir.to_proto(model)
    if kind == "proto":
        return proto
    import onnx_graphsurgeon as gs
    return gs.import_onnx(proto)


def weight_bytes(model: ir.Model) -> int:
    return sum(int(v.const_value.nbytes) for v in _initializers(model) if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(model))


def _referenced_files(model: ir.Model) -> set[str]:
    files = set()
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.base_dir:
            files.add(str((Path(tensor.base_dir) / str(tensor.location)).resolve()))
    return files


def check_structure(path: Path, op_types: set[str] | None = None) -> None:
    """onnx.checker on the written file (it parses, external data files are where the model
    says). The contrib ops ORT registers in the ONNX domain are tolerated."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        message = _first_line(exc)
        unknown = message.split("No Op registered for ", 1)
        if len(unknown) == 2 and unknown[1].split()[0] in ORT_ONNX_DOMAIN_CONTRIB:
            return
        raise OutputError(f"rewritten model failed onnx.checker: {message}") from exc


def _check_external_name(name: str, path: Path) -> None:
    parts = Path(name).parts
    if not name or os.path.isabs(name) or len(parts) != 1 or name in (".", ".."):
        raise UsageError(f"--external-data {name!r}: give a file name (it is written beside the output)")
    if name == path.name:
        raise UsageError(f"--external-data {name!r}: must differ from the output file name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:   # a name from os.fsdecode of non-UTF-8 bytes
        raise UsageError(f"--external-data {name!r}: not UTF-8 (ONNX stores the name as UTF-8 text)") from exc


# -- what may be written where ------------------------------------------------------------------

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


def _proto_tensors(graph: onnx.GraphProto):
    """Every TensorProto of `graph` and its subgraphs (initializers and tensor attributes)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _proto_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _proto_tensors(sub)


_LOCATION_ENTRY = b"\x0a\x08location"     # the serialized key of an external_data "location" entry


def _mentions_external_data(model_path: Path) -> bool:
    """False when the file cannot reference external data (no "location" key in its bytes):
    a byte search, so that a large model with inline weights is not parsed for nothing."""
    import mmap
    try:
        with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(_LOCATION_ENTRY) >= 0
    except (OSError, ValueError):       # unreadable, or empty (mmap of 0 bytes)
        return False


def _data_files_of(model_path: Path) -> set[str]:
    """Resolved paths of the external data files the model at `model_path` references (its
    graph is parsed, no weight is read); nothing for a file that is not a model."""
    if not _mentions_external_data(model_path):
        return set()
    try:
        proto = onnx.load(str(model_path), format="protobuf", load_external_data=False)
    except Exception:
        return set()
    return {str((model_path.parent / entry.value).resolve())
            for tensor in _proto_tensors(proto.graph) if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


class _Siblings:
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
                for data in _data_files_of(model):
                    users.setdefault(data, []).append(model.name)
        return users


def _data_problem(target: Path, inputs: set[str], replacing_input: bool, siblings: _Siblings) -> str | None:
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
        locations = {str(v.const_value.location) for v in _initializers(model)
                     if isinstance(v.const_value, ir.ExternalTensor)}
        if len(locations) == 1 and len(Path(next(iter(locations))).parts) == 1:
            first = list(locations)
    base = _utf8_name(path.name)
    yield from dict.fromkeys(first + [f"{base}.data"])
    for n in range(1, 1000):
        yield f"{base}.{n}.data"


def _output_data_name(model: ir.Model, path: Path, requested, inputs: set[str], replacing_input: bool,
                      siblings: _Siblings) -> str | None:
    """The output's external data file name, or None to write the weights inline. A name the
    user gave is refused when it is unusable; the default moves on to the next free name rather
    than replace a file another model uses or one that is not a regular file."""
    if requested is not None:
        name = str(requested)
        _check_external_name(name, path)
        target = path.parent / name
        check_target(target, "external data file")
        problem = _data_problem(target, inputs, replacing_input, siblings)
        if problem:
            raise OutputError(f"{target}: {problem}; refusing to write over it (choose another "
                              "--external-data name)")
        return name
    had_external = has_external_data(model) or len(model.meta.get(INPUT_FILES, ())) > 1
    if not had_external and weight_bytes(model) <= PROTOBUF_LIMIT:
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


def _check_also_written(also_writes: dict, inputs: set[str], written: set[str], siblings: _Siblings) -> None:
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


# -- temporaries --------------------------------------------------------------------------------

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


def _temporary_model_name(external_data: str | None) -> str:
    """The model's name inside the temporary folder: ASCII, so that onnx.checker and
    onnxruntime (which take str paths as UTF-8) read it whatever the output is called."""
    return "model.onnx" if external_data != "model.onnx" else "graph.onnx"


# -- save ---------------------------------------------------------------------------------------

def save(model: ir.Model, path, *, external_data: str | None = None, overwrite: bool = False,
         source: str | os.PathLike | None = None, check: bool = True, progress=None,
         before_commit=None, also_writes: dict | None = None) -> Path:
    """Write `model` to `path` atomically: the graph is validated, everything goes to a
    temporary folder beside the target, is checked, then renamed into place (external data
    first, the model last); on any failure — an exception, Ctrl-C — nothing is left behind
    and a file that was there is restored. External data is used when asked for, when the
    source had it, or when the weights pass protobuf's 2 GiB limit.

    Nothing is replaced that is not a regular file, that belongs to the input (except the input
    itself with `overwrite`), or that another model in the folder references as external data.
    `before_commit(temporary_model_path)` runs on the complete, checked files before the rename
    (verification): when it raises, nothing is written. `also_writes` ({what: path}) names
    files the caller writes afterwards (the report): refused if they are any of these files."""
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise OutputError(f"{target_dir}: output directory does not exist")
    check_target(path, "output")
    inputs = set(model.meta.get(INPUT_FILES, ())) | _referenced_files(model)
    source_path = str(Path(source).resolve()) if source is not None else None
    if source_path:
        inputs.add(source_path)
    out_model = str(path.resolve())
    if out_model == source_path and not overwrite:
        raise OutputError(f"{path}: refusing to write over the input (pass --overwrite to allow)")
    if out_model in inputs and out_model != source_path:
        raise OutputError(f"{path}: is one of the input's files (its external data); refusing to write over it")
    siblings = _Siblings(replaced=out_model)
    users = siblings.users(path)
    if users:
        raise OutputError(f"output {path}: is the external data of {', '.join(users)}; refusing to "
                          "write over it")
    replacing_input = out_model == source_path
    external_data = _output_data_name(model, path, external_data, inputs, replacing_input, siblings)
    written = {out_model} | ({str((target_dir / external_data).resolve())} if external_data else set())
    _check_also_written(also_writes or {}, inputs, written, siblings)
    if check:
        try:
            check_graph(model)
        except Unsupported as exc:
            raise InternalError(f"rewritten model is invalid, not written (a bug: rerun with --debug and "
                                f"report it): {exc}") from exc
    remove_stale_temporaries(target_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".tmp", dir=target_dir))
    except OSError as exc:
        raise OutputError(f"{target_dir}: cannot write ({exc.strerror or exc})") from exc
    try:
        tmp_model = tmp / _temporary_model_name(external_data)
        callback = None
        if progress is not None:
            def callback(tensor, info):
                progress(info.index + 1, info.total, tensor.name)
        try:
            # one weight at a time: folded weights are computed when written (bounded memory)
            ir.save(model, tmp_model, format="protobuf", external_data=external_data, callback=callback,
                    max_workers=1)
        except (OSError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise OutputError(f"{path}: cannot serialize the model ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc
        if check:
            try:
                check_structure(tmp_model)
            except OutputError as exc:
                raise InternalError(f"{exc} (a bug: rerun with --debug and report it; nothing written)") from exc
        if before_commit is not None:
            before_commit(tmp_model)
        moves = []
        if external_data and (tmp / external_data).exists():
            moves.append((tmp / external_data, target_dir / external_data))
        moves.append((tmp_model, path))
        _commit(moves, tmp)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _commit(moves: list[tuple[Path, Path]], tmp: Path) -> None:
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
