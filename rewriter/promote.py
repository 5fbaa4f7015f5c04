"""A model's float tensors retyped — FLOAT16 → FLOAT for an fp32 reference, every float type →
DOUBLE for the float64 one (rewriter.verify's noise floor) — and its float weights counted."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


PROMOTED = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def promote(model: onnx.ModelProto, mapping: dict[int, int]) -> onnx.ModelProto:
    """A copy of `model` with every tensor type in `mapping` replaced (FLOAT16 → FLOAT: an fp32
    reference; FLOAT/FLOAT16/BFLOAT16 → DOUBLE: the float64 reference): inputs, outputs,
    value infos, initializers, Constant and ConstantOfShape values, Cast targets, subgraphs
    and functions."""
    m = onnx.ModelProto()
    m.CopyFrom(model)

    def tensor(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type not in mapping:
            return t
        arr = numpy_helper.to_array(t).astype(np.float64)
        return numpy_helper.from_array(arr.astype(helper.tensor_dtype_to_np_dtype(mapping[t.data_type])), t.name)

    def vinfo(v: onnx.ValueInfoProto):
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.elem_type in mapping:
            tt.elem_type = mapping[tt.elem_type]

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if n.op_type in ("Cast", "EyeLike", "RandomNormalLike") and a.name in ("to", "dtype") \
                        and a.i in mapping:
                    a.i = mapping[a.i]
                if a.type == onnx.AttributeProto.TENSOR:
                    a.t.CopyFrom(tensor(a.t))
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                if a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        graph(g)

    def graph(g: onnx.GraphProto):
        for coll in (g.input, g.output, g.value_info):
            for v in coll:
                vinfo(v)
        inits = [tensor(t) for t in g.initializer]
        del g.initializer[:]
        g.initializer.extend(inits)
        nodes(g.node)

    graph(m.graph)
    for f in m.functions:
        nodes(f.node)
    return m


def float_weight_bytes(model) -> int:
    """Bytes of the model's float weights, initializers and Constant tensors (exports that keep
    every weight in a Constant node: patterns.graph.weight_bytes counts initializers only),
    external ones included, read from the proto without loading external data."""
    proto = load_proto(model, weights=False)
    total = 0

    def add(t: onnx.TensorProto):
        nonlocal total
        if t.data_type in PROMOTED:
            total += int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    def graph(g: onnx.GraphProto):
        for t in g.initializer:
            add(t)
        nodes(g.node)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    add(a.t)
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    graph(g)

    graph(proto.graph)
    for f in proto.functions:
        nodes(f.node)
    return total


def load_proto(model, weights: bool) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=weights)

__all__ = ["PROMOTED", "float_weight_bytes", "load_proto", "promote"]
