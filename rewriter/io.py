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

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import BadInput, OutputError, Unsupported, UsageError

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
    files = check_external_data(model, path.parent)
    model.meta[INPUT_FILES] = [str(path.resolve())] + sorted(files)
    return model


def _initializers(model: ir.Model):
    for graph in model.graphs():
        yield from graph.initializers.values()


def _external_location(tensor: ir.ExternalTensor, base: Path, name: str) -> Path:
    location = str(tensor.location)
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise BadInput(f"external data location {location!r} of tensor {name!r} is not a relative "
                       "path inside the model's folder")
    return Path(tensor.base_dir or base) / location


def check_external_data(model: ir.Model, base: Path) -> set[str]:
    """Every external tensor's file exists and is long enough (stat only, reads nothing).
    Returns the resolved paths of the external data files."""
    sizes: dict[str, int] = {}
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


def save(model: ir.Model, path, *, external_data: str | None = None, overwrite: bool = False,
         source: str | os.PathLike | None = None, check: bool = True, progress=None) -> Path:
    """Write `model` to `path` atomically: the graph is validated, everything goes to a
    temporary folder beside the target, is checked, then renamed into place (external data
    first, the model last); on any failure — an exception, Ctrl-C — nothing is left behind
    and a file that was there is restored. External data is used when asked for, when the
    source had it, or when the weights pass protobuf's 2 GiB limit."""
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise OutputError(f"{target_dir}: output directory does not exist")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    inputs = set(model.meta.get(INPUT_FILES, ())) | _referenced_files(model)
    source_path = str(Path(source).resolve()) if source is not None else None
    if source_path:
        inputs.add(source_path)
    out_model = str(path.resolve())
    if out_model == source_path and not overwrite:
        raise OutputError(f"{path}: refusing to write over the input (pass --overwrite to allow)")
    if out_model in inputs and out_model != source_path:
        raise OutputError(f"{path}: is one of the input's files (its external data); refusing to write over it")
    if external_data is None and (has_external_data(model) or weight_bytes(model) > PROTOBUF_LIMIT):
        external_data = path.name + ".data"
        old = [Path(f) for f in inputs - {source_path}]
        if out_model == source_path and len(old) == 1 and old[0].parent == Path(out_model).parent:
            external_data = old[0].name     # overwriting: the weights replace the input's data file
    if external_data is not None:
        external_data = str(external_data)
        _check_external_name(external_data, path)
        out_data = str((target_dir / external_data).resolve())
        if out_data in inputs and not (overwrite and out_model == source_path):
            raise OutputError(f"{target_dir / external_data}: is a file of the input model; refusing to "
                              "write over it (choose another --external-data name)")
    if check:
        try:
            check_graph(model)
        except Unsupported as exc:
            raise OutputError(f"rewritten model is invalid, not written (a bug): {exc}") from exc
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=target_dir))
    except OSError as exc:
        raise OutputError(f"{target_dir}: cannot write ({exc.strerror or exc})") from exc
    try:
        tmp_model = tmp / path.name
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
            check_structure(tmp_model)
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
