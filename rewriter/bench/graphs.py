"""One ONNX graph builder for tests, calibration probes and synthesized benchmark graphs.

Values are named strings and nodes onnx.helper protos, so a graph is cheap to write by hand
and saved as it was built (no onnx_ir round trip). Users: tests/builders.py (the norm forms
the matcher must recognize), rewriter/calibrate.py (the probe chains), benchmarks/op_level.py
(the norm → projection chains) and models/synth_llama.py (Llama-shaped decoders; its weights
are streamed to the external data file by its own store and added here as finished
TensorProtos, so the builder never holds them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rewriter.io import PROTOBUF_LIMIT


def tensor_type(dtype) -> int:
    """The TensorProto element type of a numpy dtype (or the TensorProto enum itself)."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class GraphBuilder:
    """Nodes, initializers, inputs and outputs of one graph. `sep` goes between a name's hint
    and its counter ("mul3" or "mul_3")."""

    def __init__(self, opset: int = 18, seed: int = 0, *, sep: str = ""):
        self.opset = opset
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.rng = np.random.default_rng(seed)
        self.sep = sep
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self.sep}{self._n}"

    def node_name(self, op_type: str, outputs: list[str]) -> str:
        return self.name(op_type)

    def input(self, name: str, shape, dtype=np.float32) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, tensor_type(dtype), shape))
        return name

    def output(self, name: str, dtype=np.float32, shape=None):
        self.outputs.append(helper.make_tensor_value_info(name, tensor_type(dtype), shape or [None] * 3))

    def const(self, array, hint: str = "c", as_node: bool = False) -> str:
        array = np.asarray(array)
        name = self.name(hint)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def initializer(self, tensor: TensorProto) -> str:
        """Add a finished TensorProto (its data may already be in an external file)."""
        self.inits.append(tensor)
        return tensor.name

    def weight(self, n: int, k: int, dtype=np.float32) -> str:
        return self.const((self.rng.standard_normal((n, k)) / np.sqrt(n)).astype(dtype), "W")

    def gain(self, n: int, dtype=np.float32) -> np.ndarray:
        return (1.0 + 0.3 * self.rng.standard_normal(n)).astype(dtype)

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", *, hint: str | None = None,
           **attrs):
        """Append a node; returns its output name (a list of them when n_out > 1)."""
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.node_name(op_type, outs),
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, *, contrib: bool = True, name: str = "g", **kwargs) -> onnx.ModelProto:
        """The ModelProto (ir_version 10); `contrib` imports com.microsoft (ORT's fused ops)."""
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        if contrib:
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        return helper.make_model(graph, opset_imports=opsets, ir_version=10, **kwargs)

    def save(self, path, model: onnx.ModelProto | None = None) -> int:
        """Write `model` (default: self.model()); the weights go to PATH.data beside it when
        they would pass protobuf's limit (rewriter.io.PROTOBUF_LIMIT). Returns the weight bytes."""
        model = self.model() if model is None else model
        nbytes = sum(t.ByteSize() for t in self.inits)
        path = Path(path)
        if nbytes > PROTOBUF_LIMIT:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
        return int(nbytes)

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

    def layernorm(self, x: str, *, gain=None, beta=None, eps=1e-5, inverse="div", cast=None) -> str:
        """Decomposed LayerNorm; `cast` = compute dtype (Cast in and back out, before γ/β)."""
        x = self.op("Cast", [x], to=TensorProto.FLOAT) if cast else x
        mean = self.reduce_mean(x)
        d = self.op("Sub", [x, mean])
        var = self.reduce_mean(self.op("Pow", [d, self.const(np.array(2.0, np.float32))]))
        root = self.op("Sqrt", [self.op("Add", [var, self.const(np.array(eps, np.float32), "eps")])])
        y = self.op("Div", [d, root]) if inverse == "div" else self.op("Mul", [d, self.op("Reciprocal", [root])])
        if cast:
            y = self.op("Cast", [y], to=cast)
        if gain is not None:
            y = self.op("Mul", [y, self.const(gain, "gamma")])
        if beta is not None:
            y = self.op("Add", [y, self.const(beta, "beta")])
        return y

    def dyt(self, x: str, *, alpha=0.7, gain=None, beta=None, dtype=np.float32) -> str:
        y = self.op("Tanh", [self.op("Mul", [x, self.const(np.array(alpha, dtype), "alpha")])])
        if gain is not None:
            y = self.op("Mul", [self.const(gain, "g"), y])
        if beta is not None:
            y = self.op("Add", [y, self.const(beta, "b")])
        return y


__all__ = ["GraphBuilder", "tensor_type"]
