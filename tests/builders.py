"""Tiny hand-built graphs, one per form the matcher must recognize (no exporter involved).

The builder is rewriter.bench.graphs.GraphBuilder: one builder for the tests, the calibration
probes and the synthesized benchmark graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from rewriter.bench.graphs import GraphBuilder, tensor_type
from rewriter.promote import promote

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
              np.int64: TensorProto.INT64, np.float64: TensorProto.DOUBLE}


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` computing in float64 (rewriter.promote.promote, FLOAT → DOUBLE: initializers,
    Constants, Cast targets, declared types, subgraphs and functions). The float64 reference
    of an fp32 export (onnxruntime CPU has double kernels for the ops exporters emit)."""
    return promote(model, {TensorProto.FLOAT: TensorProto.DOUBLE})


__all__ = ["GraphBuilder", "NP_TO_ONNX", "float64_copy", "tensor_type"]
