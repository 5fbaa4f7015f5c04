"""The deferred scale laid out like each linear's input: the row moves (Transpose, Slice,
Gather, Split, Concat, zero Pad) and Reshapes between the norm's output and the linear are
mirrored on the per-row scale, so each row of the linear meets its own 1/RMS."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns import Linear
from rewriter.patterns.graph import const_array, dtype_of, op, set_dtype
from rewriter.plumbing import Plumbing


class RowMoves(Plumbing):
    """The scale through the linears' row moves (a room of transform.Rewriter)."""

    def __init__(self, graph: ir.Graph, edit):
        super().__init__(graph, edit)
        self._mirrors: dict = {}

    def scale_for(self, linear: Linear, scale: ir.Value, root: ir.Value | None = None) -> ir.Value:
        """The per-row scale (fp32) laid out like the linear's input: every row move and Reshape
        between `root` (what the norm's output became) and the linear is mirrored on the scale
        (a Reshape's last axis set to 1), so each row of the linear meets its own 1/RMS."""
        if root is None:
            return self._scale_along_path(linear, scale)
        memo = self._mirrors.setdefault((id(root), id(scale)), {root: scale})   # shared by the linears

        def mirror(value: ir.Value) -> ir.Value:
            if value in memo:
                return memo[value]
            node = value.producer()
            if op(node, "Reshape", domain=""):
                out = self.reshape_scale(node, mirror(node.inputs[0]))
            elif op(node, "Cast", "CastLike", "Identity", "Pad", domain=""):   # Pad: all-zero pads only
                out = mirror(node.inputs[0])
            else:       # Transpose, Slice, Gather, Split, Concat: the same op on the scale
                inputs = [mirror(v) if i == 0 or op(node, "Concat") else v for i, v in enumerate(node.inputs)]
                copy = self.edit.node(node.op_type, inputs, {a.name: a for a in node.attributes.values()},
                                      num_outputs=len(node.outputs), hint="scale_move")
                out = copy.outputs[list(node.outputs).index(value)]
                set_dtype(out, dtype_of(scale))
            memo[value] = out
            return out

        return mirror(linear.node.inputs[0])

    def reshape_scale(self, node: ir.Node, s: ir.Value) -> ir.Value:
        target = const_array(node.inputs[1])
        if target is not None:
            target = target.astype(np.int64).copy()
            target[-1] = 1
            shape = self.edit.initializer(target, "scale_shape")
        else:       # the reshaped activation's shape with the last axis set to 1
            e = self.edit
            rows = e.slice(e.op1("Shape", node.outputs[0]), [0], [-1])
            shape = e.op1("Concat", rows, e.initializer(np.array([1], np.int64), "one"), axis=0)
        return self.edit.op1("Reshape", s, shape, hint="scale_r")

    def _scale_along_path(self, linear: Linear, scale: ir.Value) -> ir.Value:
        s = scale
        for node in linear.path:
            if op(node, "Reshape", domain=""):
                s = self.reshape_scale(node, s)
        return s
