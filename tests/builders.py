"""Tiny hand-built graphs, one per form the matcher must recognize (no exporter involved).

The builder is rewriter.bench.graphs.GraphBuilder: one builder for the tests, the calibration
probes and the synthesized benchmark graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rewriter.bench.graphs import GraphBuilder, tensor_type

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
              np.int64: TensorProto.INT64, np.float64: TensorProto.DOUBLE}


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computing in float64: every fp32 initializer, Constant (ConstantOfShape value),
    Cast target and declared value type becomes DOUBLE. The float64 reference of an fp32
    export (onnxruntime CPU has double kernels for the ops exporters emit); main graph only."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return model


__all__ = ["GraphBuilder", "NP_TO_ONNX", "float64_copy", "tensor_type"]
