"""Is this a graph onnxruntime could run? Checks made before anything is rewritten (exit 4
when not) and on what is written (a failure there is a bug: exit 7).

Validation (`check_graph`) runs on a *skeleton* of the model: the graph with every large or
external initializer replaced by a typed graph input, so that onnx.checker and strict shape
inference see the structure and the types without a byte of weight being read or copied.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from rewriter.errors import OutputError, Unsupported, first_line
from rewriter.inline import SpanTensor, read_structure
from rewriter.patterns.graph import initializers


KNOWN_DOMAINS = {"", "ai.onnx", "com.microsoft", "ai.onnx.ml", "pkg.onnxscript.torch_lib",
                 "pkg.onnxscript.torch_lib.common", "pkg.torch.onnx", "ai.onnx.preview.training"}


MAX_ONNX_OPSET = onnx.defs.onnx_opset_version()
# onnxruntime guarantees opset 7 and later (it warns below that and has no kernel for most ops
# before 7, e.g. Mul-6 with its broadcast/axis attributes); the patterns read every op of 7 and
# later by its own signature (rewriter.patterns.graph: Pad, Slice, Reduce*, Reshape accessors)
MIN_ONNX_OPSET = 7


# ops onnxruntime registers in the ONNX domain although the ONNX standard has no such op (at
# that opset): the checker would call them unknown, so they are checked as contrib ops
ORT_ONNX_DOMAIN_CONTRIB = {"SimplifiedLayerNormalization": 10**9, "LayerNormalization": 17}  # op: first ONNX opset that has it


SKELETON_MIN_BYTES = 1024           # initializers above this size become typed inputs


def check_supported(model: ir.Model) -> None:
    imports = model.graph.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        raise Unsupported("model imports no default ONNX opset")
    if version > MAX_ONNX_OPSET:
        raise Unsupported(f"opset {version} is newer than this onnx supports ({MAX_ONNX_OPSET})")
    if version < 1:
        raise Unsupported(f"invalid default opset version {version}")
    if version < MIN_ONNX_OPSET:
        raise Unsupported(f"opset {version} is older than onnxruntime supports ({MIN_ONNX_OPSET} and later): "
                          "upgrade it first (onnx.version_converter.convert_version)")
    for function in model.functions.values():
        own = function.opset_imports.get("", function.opset_imports.get("ai.onnx"))
        if own is not None and own < MIN_ONNX_OPSET:
            raise Unsupported(f"function {function.name!r} imports opset {own}, older than onnxruntime "
                              f"supports ({MIN_ONNX_OPSET} and later)")
    local = {domain for domain, _, _ in model.functions}
    for node in model.graph.all_nodes():
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise Unsupported(f"node {node.name!r} uses unknown domain {node.domain!r}")


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
    for value in initializers(model):
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
        if isinstance(tensor, SpanTensor):
            try:
                needed = tensor.nbytes
            except TypeError:           # STRING: no fixed width, so never raw bytes
                raise Unsupported(f"invalid tensor {name!r}: {tensor.dtype.name} data stored as raw bytes") from None
            if tensor.length != needed:
                raise Unsupported(f"invalid tensor {name!r}: data does not match its type and shape ({tensor.length} "
                                  f"bytes of data, {tensor.dtype.name} {list(tensor.shape)} needs {needed})")
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
                              f"({first_line(exc, 160)})") from exc


def skeleton(model: ir.Model, for_checker: bool = True) -> onnx.ModelProto:
    """The model as a ModelProto with every external or large initializer turned into a typed
    main-graph input: no weight is read or copied, checker and shape inference still see
    every type and shape. Small initializers (axes, shapes, epsilons) stay as they are.
    `for_checker`: ORT's contrib ops in the ONNX domain move to com.microsoft, where
    onnx.checker knows them (onnxruntime wants them where they are)."""
    swapped: list[tuple[ir.Value, object]] = []
    try:
        for value in initializers(model):
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
    if not for_checker:
        return proto
    # ORT's contrib ops in the ONNX domain: check them as the contrib ops they are
    default = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    contrib = False

    def as_contrib(graph: onnx.GraphProto) -> None:
        nonlocal contrib
        for node in graph.node:
            since = ORT_ONNX_DOMAIN_CONTRIB.get(node.op_type)
            if node.domain in ("", "ai.onnx") and since is not None and default < since:
                node.domain, contrib = "com.microsoft", True
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    as_contrib(sub)

    as_contrib(proto.graph)
    if contrib and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


def _rank_declared(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` for onnx.checker, which insists that the main graph's tensor inputs and outputs
    declare a shape: one declared without (rank unknown — onnxruntime runs such a model) gets an
    empty one in a copy. The checker infers nothing; shape inference reads the model as it is."""
    unshaped = [i for i in list(proto.graph.input) + list(proto.graph.output)
                if i.type.HasField("tensor_type") and not i.type.tensor_type.HasField("shape")]
    if not unshaped:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for info in list(copy.graph.input) + list(copy.graph.output):
        if info.type.HasField("tensor_type") and not info.type.tensor_type.HasField("shape"):
            info.type.tensor_type.shape.SetInParent()
    return copy


def _undeclared(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` without its value_info and with its outputs' shapes unset (types kept): what is
    left to check is what the graph itself says."""
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    for output in bare.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    return bare


def _shape_of(info: onnx.ValueInfoProto):
    tensor = info.type.tensor_type
    dims = None if not tensor.HasField("shape") else [d.dim_value if d.HasField("dim_value") else None
                                                      for d in tensor.shape.dim]
    return tensor.elem_type, dims


def stale_declarations(proto: onnx.ModelProto, inferred: onnx.ModelProto) -> dict[str, str]:
    """Declared value_info and output shapes that contradict what the graph infers:
    name -> 'declared …, inferred …'. onnxruntime merges such declarations leniently."""
    found = {}
    known = {i.name: i for i in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for info in list(proto.graph.value_info) + list(proto.graph.output):
        other = known.get(info.name)
        if other is None or not info.type.HasField("tensor_type"):
            continue
        (t1, d1), (t2, d2) = _shape_of(info), _shape_of(other)
        clash = (t1 and t2 and t1 != t2) or (d1 is not None and d2 is not None and (
            len(d1) != len(d2) or any(a and b and a != b for a, b in zip(d1, d2))))
        if clash:
            found[info.name] = f"declared {onnx.TensorProto.DataType.Name(t1)}{d1}, inferred " \
                               f"{onnx.TensorProto.DataType.Name(t2)}{d2}"
    return found


def check_proto(proto: onnx.ModelProto) -> dict[str, str]:
    """onnx.checker (structure, topological order, schemas), then strict shape inference on
    what the graph itself says (types consistent, every op's inputs acceptable; unknown ops
    are skipped). Declarations that contradict it are not errors — onnxruntime merges them
    leniently — they are returned (name -> what clashes) to be repaired and reported."""
    try:
        onnx.checker.check_model(_rank_declared(proto))
    except Exception as exc:
        raise Unsupported(f"invalid graph: {first_line(exc)}") from exc
    bare = _undeclared(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, check_type=True, strict_mode=True)
    except Exception as exc:
        raise Unsupported(f"invalid graph (shape inference): {first_line(exc)}") from exc
    return stale_declarations(proto, inferred)


def check_graph(model: ir.Model) -> dict[str, str]:
    """Raise Unsupported when the graph is invalid: a dangling input, a cycle, a node that
    fails its schema, types that contradict each other. Returns the declared shapes and types
    (value_info, outputs) that contradict the graph: name -> what clashes."""
    check_dangling(model)
    check_order(model)
    check_tensors(model)
    try:
        proto = skeleton(model)
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"invalid graph: cannot serialize ({type(exc).__name__}: "
                          f"{first_line(exc)})") from exc
    return check_proto(proto)


def drop_stale(model: ir.Model, stale: dict[str, str]) -> list[str]:
    """Forget the stale shape (and type) declared for intermediate values, so they are inferred
    anew; a graph output keeps the producer's declaration (its interface). Returns warnings."""
    notes = []
    outputs = {v.name for v in model.graph.outputs}
    for graph in model.graphs():
        for node in graph:
            for value in node.outputs:
                if value.name in stale and value.name not in outputs:
                    value.shape, value.type = None, None
    dropped = sorted(set(stale) - outputs)
    if dropped:
        notes.append(f"dropped {len(dropped)} stale value_info declaration(s) that contradict the graph "
                     f"(re-inferred), e.g. {dropped[0]!r}: {stale[dropped[0]]}")
    kept = sorted(set(stale) & outputs)
    if kept:
        notes.append(f"declared shape of output {kept[0]!r} contradicts the graph ({stale[kept[0]]}); "
                     "kept as declared (onnxruntime merges it leniently)")
    return notes


def check_structure(path: Path, op_types: set[str] | None = None, framing_only: bool = False) -> None:
    """onnx.checker on the written file (it parses, external data files are where the model
    says). The contrib ops ORT registers in the ONNX domain are tolerated. `framing_only`:
    the file parses (its large inline tensors' bytes are not read)."""
    if framing_only:
        if read_structure(str(path)) is None:
            raise OutputError("rewritten model does not parse back (its protobuf framing)")
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        message = first_line(exc)
        if "Field 'shape' of 'type' is required" in message:     # an input or output of unknown rank
            proto = onnx.load(str(path), load_external_data=False)
            ranked = _rank_declared(proto)
            if ranked is not proto:    # checked as a file beside it: its data files resolve
                declared = Path(path).with_name(f".{Path(path).name}.ranked.onnx")
                try:
                    onnx.save(ranked, str(declared))
                    onnx.checker.check_model(str(declared))
                    return
                except Exception as again:          # noqa: BLE001 - reported below like the first
                    message = first_line(again)
                finally:
                    declared.unlink(missing_ok=True)
        unknown = message.split("No Op registered for ", 1)
        if len(unknown) == 2 and unknown[1].split()[0] in ORT_ONNX_DOMAIN_CONTRIB:
            return
        raise OutputError(f"rewritten model failed onnx.checker: {message}") from exc
