"""Tiny hand-built graphs, one per form the matcher must recognize (no exporter involved).

The builder is rewriter.bench.graphs.GraphBuilder: one builder for the tests, the calibration
probes and the synthesized benchmark graphs."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from rewriter.bench.graphs import GraphBuilder, tensor_type

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
              np.int64: TensorProto.INT64}

__all__ = ["GraphBuilder", "NP_TO_ONNX", "tensor_type"]
