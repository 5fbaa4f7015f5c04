"""Tiny hand-built graphs, one per form the matcher must recognize (no exporter involved)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16,
              np.int64: TensorProto.INT64}


class GraphBuilder:
    def __init__(self, opset: int = 18, seed: int = 0):
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.default_rng(seed)
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def input(self, name: str, shape, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[dtype], shape))
        return name

    def const(self, array, hint: str = "c", as_node: bool = False) -> str:
        array = np.asarray(array)
        name = self.name(hint)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, n: int, k: int, dtype=np.float32) -> str:
        return self.const((self.rng.standard_normal((n, k)) / np.sqrt(n)).astype(dtype), "W")

    def gain(self, n: int, dtype=np.float32) -> np.ndarray:
        return (1.0 + 0.3 * self.rng.standard_normal(n)).astype(dtype)

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, name: str, dtype=np.float32, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[dtype], shape or [None] * 3))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        return model

    # -- norms ----------------------------------------------------------------------------
    def reduce_mean(self, x: str) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const(np.array([-1], np.int64), "axes")], keepdims=1)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def rms(self, x: str, *, square="pow", inverse="reciprocal", eps=1e-5, gain=None,
            gain_side="left", gain_as="init", cast=None) -> str:
        """Decomposed RMSNorm; `cast` = compute dtype (Cast in and back out)."""
        xin = self.op("Cast", [x], to=TensorProto.FLOAT) if cast else x
        sq = self.op("Pow", [xin, self.const(np.array(2.0, np.float32))]) if square == "pow" \
            else self.op("Mul", [xin, xin])
        ms = self.reduce_mean(sq)
        if eps is not None:
            ms = self.op("Add", [ms, self.const(np.array(eps, np.float32), "eps", as_node=gain_as == "node")])
        root = self.op("Sqrt", [ms])
        if inverse == "reciprocal":
            y = self.op("Mul", [xin, self.op("Reciprocal", [root])])
        elif inverse == "div_one":
            y = self.op("Mul", [xin, self.op("Div", [self.const(np.array(1.0, np.float32)), root])])
        else:
            y = self.op("Div", [xin, root])
        if cast:
            y = self.op("Cast", [y], to=cast)
        if gain is None:
            return y
        if gain_as == "one_plus":      # Gemma: gain = 1 + w as a constant subgraph
            g = self.op("Add", [self.const(np.array(1.0, gain.dtype)), self.const(gain - 1, "w")])
        else:
            g = self.const(gain, "gain", as_node=gain_as == "node")
        return self.op("Mul", [g, y] if gain_side == "left" else [y, g])

    def layernorm(self, x: str, *, gain=None, beta=None, eps=1e-5, inverse="div") -> str:
        mean = self.reduce_mean(x)
        d = self.op("Sub", [x, mean])
        var = self.reduce_mean(self.op("Pow", [d, self.const(np.array(2.0, np.float32))]))
        root = self.op("Sqrt", [self.op("Add", [var, self.const(np.array(eps, np.float32), "eps")])])
        y = self.op("Div", [d, root]) if inverse == "div" else self.op("Mul", [d, self.op("Reciprocal", [root])])
        if gain is not None:
            y = self.op("Mul", [y, self.const(gain, "gamma")])
        if beta is not None:
            y = self.op("Add", [y, self.const(beta, "beta")])
        return y

    def dyt(self, x: str, *, alpha=0.7, gain=None, beta=None) -> str:
        y = self.op("Tanh", [self.op("Mul", [x, self.const(np.array(alpha, np.float32), "alpha")])])
        if gain is not None:
            y = self.op("Mul", [self.const(gain, "g"), y])
        if beta is not None:
            y = self.op("Add", [y, self.const(beta, "b")])
        return y
