"""The graph-query vocabulary over onnx_ir: what the rules (and the passes above them) ask of a graph.

Everything here reads the graph; only `GraphEditor` creates nodes. Constants are looked up
lazily: `const_tensor` never materializes a weight, `const_array` does (use it for gains,
epsilons and shapes, not for projection weights).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from .schema import attr, bind_scopes, node_opset, opset_imports


def op(node: ir.Node | None, *op_types: str, domain: str | None = None) -> bool:
    """True when `node` is one of `op_types` (default ONNX or ORT contrib domain)."""
    if node is None or node.op_type not in op_types:
        return False
    if domain is None:
        return node.domain in ("", "ai.onnx", "com.microsoft")
    return node.domain == domain


def users(value: ir.Value) -> list[tuple[ir.Node, int]]:
    return [(u.node, u.idx) for u in value.uses()]


def reads_type_only(node: ir.Node, index: int) -> bool:
    """CastLike's second input (target_type) is read for its element type only: dynamo exports
    write `x + 1e-5` as Add(x, CastLike(1e-5, x)) and a gain as Mul(CastLike(w, x), x)."""
    return index == 1 and op(node, "CastLike", domain="")


def value_users(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """The readers of `value`'s values: `users` less those that read only its type (they read a
    value of the same type when the rewrite replaces `value`)."""
    return [(node, index) for node, index in users(value) if not reads_type_only(node, index)]


def is_used(value: ir.Value | None) -> bool:
    """Read by a node or returned by the graph."""
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind `value` (initializer or Constant node), without loading it."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    node = value.producer()
    if op(node, "Constant", domain="") and "value" in node.attributes:
        return node.attributes["value"].as_tensor()
    return None


def const_array(value: ir.Value | None, follow: bool = True) -> np.ndarray | None:
    """Numpy value of a small constant, following Identity/Cast/Transpose/Add/Mul/Sub of
    constants when `follow` (covers Gemma's `1 + w` if it was not folded by the exporter)."""
    if value is None:
        return None
    tensor = const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is None or not follow:
        return None
    if op(node, "Constant", domain=""):
        for key in ("value_float", "value_int", "value_floats", "value_ints"):
            if key in node.attributes:
                return np.asarray(node.attributes[key].value)
        return None
    if op(node, "Identity", domain=""):
        return const_array(node.inputs[0])
    if is_cast(node):
        arr, to = const_array(node.inputs[0]), cast_to(node)
        return None if arr is None or to is None else arr.astype(to.numpy())
    if op(node, "Add", "Sub", "Mul", "Div", domain="") and len(node.inputs) == 2:
        a, b = const_array(node.inputs[0]), const_array(node.inputs[1])
        if a is None or b is None:
            return None
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[node.op_type]
        return fn(a, b).astype(a.dtype)
    return None


# ops a small constant subgraph may be evaluated through (TorchScript computes F.pad's pads,
# Reshape targets and Slice bounds from constants this way)
_FOLDABLE = ("Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Squeeze",
             "Unsqueeze", "Gather", "Identity", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Range", "Shape")


def static_shape(value: ir.Value, depth: int = 8) -> list[int] | None:
    """The value's shape when every dim is known — also through Cast/Identity and a Pad whose
    pads fold to zeros (shape inference leaves those unknown when the pads are computed)."""
    shape = value.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return [int(d) for d in shape]
    node = value.producer()
    if depth and node is not None:
        if op(node, "Cast", "Identity", domain=""):
            return static_shape(node.inputs[0], depth - 1)
        if op(node, "Pad", domain=""):
            pads, _, _ = pad_spec(node, rank_of(node.inputs[0]))
            if pads is not None and not np.any(pads):
                return static_shape(node.inputs[0], depth - 1)
    return None


def folded_constant(value: ir.Value | None, limit: int = 80) -> np.ndarray | None:
    """`const_array`, or the value of a small subgraph whose leaves are constants (or static
    shapes read by Shape), evaluated with the ONNX reference evaluator; None otherwise."""
    direct = const_array(value)
    if direct is not None or value is None:
        return direct
    nodes: list[ir.Node] = []
    leaves: dict[str, np.ndarray] = {}
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or v.name in seen:
            continue
        seen.add(v.name)
        c = const_array(v, follow=False)
        if c is not None:
            leaves[v.name] = c
            continue
        node = v.producer()
        if node is None or not op(node, *_FOLDABLE, domain="") or len(nodes) >= limit:
            return None
        if op(node, "Shape", domain=""):
            shape = static_shape(node.inputs[0])
            if shape is not None and not node.attributes:
                leaves[node.outputs[0].name] = np.array(shape, np.int64)
                continue
        nodes.append(node)
        stack.extend(node.inputs)
    try:
        owner = nodes[0].graph
        position = {id(n): i for i, n in enumerate(owner)} if owner is not None else {}
        nodes.sort(key=lambda n: position.get(id(n), 0))
        version = node_opset(nodes[0])
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes], "fold", [],
            [onnx.helper.make_tensor_value_info(value.name, 0, None)],
            [onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in leaves.items()])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", version)])
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception:       # anything the evaluator cannot run is simply not a known constant
        return None


def broadcast_scalar(value: ir.Value | None, rank: int | None) -> float | None:
    """The value of a one-element constant that broadcasts against a tensor of `rank` without
    adding an axis (an ε of shape [1,1,1] on a rank-2 tensor would make the result rank 3)."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.ndim > (1 if rank is None else rank):
        return None
    return float(arr.reshape(()))


def is_float(dtype) -> bool:
    """A floating-point numpy dtype, bfloat16 and the float8s included (numpy calls those 'V')."""
    try:
        return ir.DataType.from_numpy(np.dtype(dtype)).is_floating_point()
    except (TypeError, ValueError):
        return False


def is_const(value: ir.Value | None) -> bool:
    return value is not None and (const_tensor(value) is not None or const_array(value) is not None)


def is_cast(node: ir.Node | None) -> bool:
    """Cast, or CastLike (its type from a second input: dynamo exports write ε, gains and
    activations' conversions that way)."""
    return op(node, "Cast", "CastLike", domain="")


def cast_to(node: ir.Node) -> ir.DataType | None:
    """The type a Cast or CastLike converts to (None when a CastLike's target is unknown)."""
    if node.op_type == "Cast":
        return ir.DataType(attr(node, "to"))
    return dtype_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None


def through_casts(value: ir.Value) -> ir.Value:
    """Walk up through Cast/CastLike/Identity nodes to the value they started from."""
    node = value.producer()
    while (is_cast(node) or op(node, "Identity", domain="")) and node.inputs[0] is not None:
        value = node.inputs[0]
        node = value.producer()
    return value


# (from, to) float conversions that are exact for every value
WIDENING = {(ir.DataType.FLOAT16, ir.DataType.FLOAT), (ir.DataType.BFLOAT16, ir.DataType.FLOAT),
            (ir.DataType.FLOAT, ir.DataType.DOUBLE), (ir.DataType.FLOAT16, ir.DataType.DOUBLE),
            (ir.DataType.BFLOAT16, ir.DataType.DOUBLE)}


def holds(wide: ir.DataType | None, narrow: ir.DataType | None) -> bool:
    """Every value of type `narrow` is exact in type `wide`."""
    return wide is not None and (wide == narrow or (narrow, wide) in WIDENING)


def exact_source(value: ir.Value) -> ir.Value:
    """Follow widening Casts back to the narrowest exact copy of `value`."""
    node = value.producer()
    while is_cast(node) and holds(dtype_of(value), dtype_of(node.inputs[0])) \
            and dtype_of(value) != dtype_of(node.inputs[0]):
        value = node.inputs[0]
        node = value.producer()
    return value


def initializers(model: ir.Model) -> Iterable[ir.Value]:
    """Every initializer of every graph (subgraphs included)."""
    for graph in model.graphs():
        yield from graph.initializers.values()


def weight_bytes(model: ir.Model) -> int:
    return sum(int(v.const_value.nbytes) for v in initializers(model) if v.const_value is not None)


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in initializers(model))


def residual_add(node: ir.Node | None, trust_unknown_shapes: bool = False) -> bool:
    """An Add of two activations (not constants) of the same rank and hidden size: a residual
    sum. Leading dims are not compared (exporters name the same symbolic dim differently).
    `trust_unknown_shapes`: two non-constant operands count when a shape is not known."""
    if not op(node, "Add", domain="") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if a is None or b is None or is_const(a) or is_const(b):
        return False
    if a.shape is None or b.shape is None:
        return trust_unknown_shapes
    if len(a.shape) != len(b.shape) or len(a.shape) < 2:
        return False
    return isinstance(a.shape[-1], int) and a.shape[-1] == b.shape[-1]


def same_source(a: ir.Value, b: ir.Value) -> bool:
    return a is b or through_casts(a) is through_casts(b)


# ops whose output has the dtype of their first input
_SAME_DTYPE = ("Mul", "Add", "Sub", "Div", "MatMul", "Gemm", "Reshape", "Identity", "Transpose",
               "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Neg", "Slice", "Concat", "Squeeze",
               "Unsqueeze", "Relu", "Tanh", "Sigmoid", "Softmax", "Gather", "Split", "Expand",
               "FusedMatMul", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
               "LayerNormalization", "SkipLayerNormalization", "RMSNormalization")


def dtype_of(value: ir.Value, _depth: int = 0) -> ir.DataType | None:
    """The element type of `value`, from its type, its constant, or its producer."""
    if value.dtype is not None:
        return value.dtype
    tensor = const_tensor(value)
    if tensor is not None:
        return tensor.dtype
    node = value.producer()
    if op(node, "Cast", domain=""):
        return ir.DataType(node.attributes["to"].value)
    if _depth < 64 and op(node, "CastLike", domain="") and node.inputs[1] is not None:
        return dtype_of(node.inputs[1], _depth + 1)
    if _depth < 64 and node is not None and node.op_type in _SAME_DTYPE:
        source = node.inputs[0]      # Gather: the table, not the indices
        if source is not None:
            return dtype_of(source, _depth + 1)
    return None


def set_dtype(value: ir.Value, dtype: ir.DataType | None) -> None:
    """Record a known element type (an unknown one is left unset, not set to None)."""
    if dtype is not None:
        value.dtype = dtype


# -- the inputs of ops whose signature changed across opsets: one accessor per op kind ---------

def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def reduce_axes(node: ir.Node, rank: int | None = None) -> list[int] | None:
    """The axes a Reduce* node reduces: an attribute before opset 18 (ReduceSum: 13), an input
    from then on. Absent (or empty) axes reduce every axis (None when `rank` is unknown), or
    none with noop_with_empty_axes ([]). None when the axes are not constant."""
    as_input = node_opset(node) >= (13 if node.op_type == "ReduceSum" else 18)
    if as_input:
        given = _input(node, 1)
        axes = None if given is None else folded_constant(given)   # dynamo: Reshape(Constant, Constant)
        if given is not None and axes is None:
            return None
    else:
        axes = attr(node, "axes")
    if axes is None or np.size(axes) == 0:
        if as_input and attr(node, "noop_with_empty_axes"):
            return []
        return None if rank is None else list(range(rank))
    return [int(a) for a in np.atleast_1d(axes)]


def pad_spec(node: ir.Node, rank: int | None) -> tuple[np.ndarray | None, object, str]:
    """(pads as [2, rank] begins/ends, the constant fill value, mode) of a Pad: pads and value
    are attributes before opset 11 and inputs from then on (constant_value optional: 0), with
    an `axes` input from opset 18 naming the padded axes. pads is None when not constant (or
    given for some axes of an unknown rank), the value None when not constant."""
    mode = attr(node, "mode")
    if node_opset(node) < 11:
        pads, value = attr(node, "pads"), attr(node, "value")
        return (None if pads is None else np.asarray(pads, np.int64).reshape(2, -1)), value, mode
    given = _input(node, 1)
    pads = None if given is None else folded_constant(given)
    fill = _input(node, 2)
    value = 0.0 if fill is None else const_array(fill)
    if pads is None:
        return None, value, mode
    pads = np.asarray(pads, np.int64).reshape(2, -1)
    axes_in = _input(node, 3)
    if axes_in is not None:
        axes = folded_constant(axes_in)
        if axes is None or rank is None:
            return None, value, mode
        full = np.zeros((2, rank), np.int64)
        for i, a in enumerate(np.atleast_1d(axes)):
            full[:, int(a) % rank] = pads[:, i]
        pads = full
    return pads, value, mode


def slice_axes(node: ir.Node) -> list[int] | None:
    """The axes a Slice cuts: starts/axes are attributes before opset 10 and inputs from then
    on; absent axes are the leading len(starts) axes. None when not constant."""
    if node_opset(node) < 10:
        starts, axes = attr(node, "starts"), attr(node, "axes")
    else:
        given = _input(node, 3)
        axes = None if given is None else folded_constant(given)
        if given is not None and axes is None:
            return None
        starts = folded_constant(_input(node, 1)) if axes is None else None
    if axes is not None:
        return [int(a) for a in np.atleast_1d(axes)]
    return None if starts is None else list(range(np.size(starts)))


def transpose_perm(node: ir.Node, rank: int | None) -> list[int] | None:
    """A Transpose's perm; absent, the axes reversed (None when `rank` is unknown)."""
    perm = attr(node, "perm")
    if perm is None:
        return None if rank is None else list(range(rank))[::-1]
    return [int(p) for p in perm]


def reshape_target(node: ir.Node) -> np.ndarray | None:
    """A Reshape's target shape (0 copies the input's dim): an attribute before opset 5, an
    input from then on. None when not constant, or when allowzero (opset 14) makes a 0 a
    zero-sized dim."""
    if node_opset(node) < 5:
        shape = attr(node, "shape")
        return None if shape is None else np.asarray(shape, np.int64)
    target = folded_constant(_input(node, 1))
    if target is not None and node_opset(node) >= 14 and attr(node, "allowzero") and not np.all(target):
        return None
    return target


def rank_of(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None


def opset(model_or_graph: ir.Model | ir.Graph, domain: str = "") -> int:
    imports = opset_imports(model_or_graph if isinstance(model_or_graph, ir.Graph) else model_or_graph.graph)
    return int(imports.get(domain, imports.get("ai.onnx", 0)))


class GraphEditor:
    """Creates nodes and initializers in one graph with names that cannot collide, emitting
    the form of each op that the model's opset requires. For a subgraph (If/Loop body) give
    the main graph as `main`: its opset and its imports (a contrib op's domain) are the model's."""

    def __init__(self, graph: ir.Graph, prefix: str = "flashnorm", main: ir.Graph | None = None):
        self.graph = graph
        self.main = main or graph
        bind_scopes(self.main)
        self.prefix = prefix
        self.opset = opset(self.main)
        self._names = {v.name for v in _all_values(graph)} | {n.name for n in graph.all_nodes()}
        self._count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"{self.prefix}/{hint}_{self._count}"
            if name not in self._names:
                self._names.add(name)
                return name

    def initializer(self, tensor_or_array, hint: str, dtype: ir.DataType | None = None,
                    graph: ir.Graph | None = None) -> ir.Value:
        """A new initializer of this graph, or of `graph` (an enclosing scope: what several
        subgraphs read)."""
        tensor = tensor_or_array
        if isinstance(tensor_or_array, np.ndarray) or np.isscalar(tensor_or_array):
            tensor = ir.tensor(np.asarray(tensor_or_array), dtype=dtype)
        name = self.fresh(hint)
        tensor.name = name
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        (graph or self.graph).register_initializer(value)
        return value

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], attributes=None, *,
             domain: str = "", num_outputs: int = 1, hint: str | None = None,
             before: ir.Node | None = None) -> ir.Node:
        node = ir.node(op_type, list(inputs), attributes or {}, domain=domain,
                       num_outputs=num_outputs, name=self.fresh(hint or op_type))
        if domain not in ("", "ai.onnx"):       # a contrib op needs its domain imported
            self.main.opset_imports.setdefault(domain, 1)
        for i, out in enumerate(node.outputs):
            out.name = self.fresh(f"{hint or op_type}_out{i}")
        if before is not None:
            self.graph.insert_before(before, node)
        else:
            self.graph.append(node)
        return node

    def op1(self, op_type: str, *inputs: ir.Value | None, hint: str | None = None, **attributes) -> ir.Value:
        out = self.node(op_type, inputs, attributes, hint=hint).outputs[0]
        return out

    def cast(self, value: ir.Value, to: ir.DataType) -> ir.Value:
        if dtype_of(value) == to:
            return value
        out = self.op1("Cast", value, to=int(to))
        out.dtype = to
        return out

    def slice(self, value: ir.Value, starts: Sequence[int], ends: Sequence[int]) -> ir.Value:
        """value[starts:ends] over its leading axes: inputs from opset 10, attributes before."""
        if self.opset >= 10:
            return self.op1("Slice", value, self.initializer(np.array(starts, np.int64), "starts"),
                            self.initializer(np.array(ends, np.int64), "ends"))
        return self.op1("Slice", value, starts=list(starts), ends=list(ends))

    def reduce_mean_last(self, value: ir.Value) -> ir.Value:
        return self.reduce_last("ReduceMean", value)

    def reduce_last(self, op_type: str, value: ir.Value) -> ir.Value:
        """`op_type` (ReduceMean, ReduceSumSquare, ...) over the last axis, keepdims."""
        if self.opset >= 18:
            axes = self.initializer(np.array([-1], dtype=np.int64), "axes")
            out = self.op1(op_type, value, axes, keepdims=1)
        else:
            out = self.op1(op_type, value, axes=[-1], keepdims=1)
        set_dtype(out, dtype_of(value))
        return out


def _all_values(graph: ir.Graph) -> Iterable[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph.all_nodes():
        yield from (v for v in node.inputs if v is not None)
        yield from node.outputs
