"""RMSNorm in every form exporters produce.

Decomposed (anchored at the ReduceMean):
    [Cast] → Pow(X, 2) | Mul(X, X) → ReduceMean(last axis, keepdims) → [Add(ε)] → Sqrt →
    Reciprocal | Div(1, ·) → Mul(X, ·)        or        Div(X, Sqrt)
    → [Cast] → [Mul(gain)] → [Cast]
Fused ops (anchored at the op): ONNX `RMSNormalization` (opset 23), ORT
`SimplifiedLayerNormalization` and `SkipSimplifiedLayerNormalization` — see patterns/fused.py.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from patterns.base import Miss, Site
from rewriter.irtools import attr, const_array, const_scalar, op, rank_of, reduce_axes, same_source, users


def _only_user(value: ir.Value, *op_types: str) -> ir.Node | None:
    uses = users(value)
    if len(uses) == 1 and op(uses[0][0], *op_types, domain="") and not value.is_graph_output():
        return uses[0][0]
    return None


def squared_input(node: ir.Node | None) -> ir.Value | None:
    """X for Pow(X, 2) or Mul(X, X)."""
    if op(node, "Pow", domain="") and const_scalar(node.inputs[1]) == 2.0:
        return node.inputs[0]
    if op(node, "Mul", domain="") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def is_last_axis_reduce(node: ir.Node, x: ir.Value) -> bool:
    axes = reduce_axes(node)
    rank = rank_of(x)
    return attr(node, "keepdims", 1) == 1 and axes is not None and len(axes) == 1 and (
        axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def centered_input(x: ir.Value) -> ir.Value | None:
    """y when x = Sub(y, ReduceMean(y)) (a LayerNorm, not an RMSNorm)."""
    sub = x.producer()
    if op(sub, "Sub", domain=""):
        mean = sub.inputs[1].producer()
        if op(mean, "ReduceMean", domain="") and same_source(mean.inputs[0], sub.inputs[0]):
            return sub.inputs[0]
    return None


def match_inverse_rms(reduce: ir.Node):
    """From the ReduceMean of squares to the normalized value.

    Returns (X, eps, normalized, nodes) or a reason string, or None when this is not a
    mean-of-squares at all."""
    square = reduce.inputs[0].producer()
    x = squared_input(square)
    if x is None or not is_last_axis_reduce(reduce, x):
        return None
    nodes = [square, reduce]
    value = reduce.outputs[0]
    eps = 0.0
    add = _only_user(value, "Add")
    if add is not None:
        eps_value = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
        eps = const_scalar(eps_value)
        if eps is None:
            return "Add after the mean of squares is not a constant ε"
        nodes.append(add)
        value = add.outputs[0]
    sqrt = _only_user(value, "Sqrt")
    if sqrt is None:
        return "mean of squares does not feed Sqrt"
    nodes.append(sqrt)
    root = sqrt.outputs[0]
    uses = users(root)
    if len(uses) != 1:
        return "1/RMS has several consumers"
    node, index = uses[0]
    if op(node, "Div", domain="") and index == 1:
        if const_scalar(node.inputs[0]) == 1.0:          # Div(1, sqrt) == Reciprocal
            inv = node
        elif same_source(node.inputs[0], x):              # Div(X, sqrt): normalized directly
            return x, eps, node.outputs[0], nodes + [node]
        else:
            return "Div by the RMS of another tensor"
    elif op(node, "Reciprocal", domain=""):
        inv = node
    else:
        return f"RMS feeds {node.op_type}"
    nodes.append(inv)
    mul = _only_user(inv.outputs[0], "Mul")
    if mul is None:
        return "1/RMS does not feed one Mul"
    other = mul.inputs[1] if mul.inputs[0] is inv.outputs[0] else mul.inputs[0]
    if not same_source(other, x):
        return "1/RMS scales a different tensor"
    return x, eps, mul.outputs[0], nodes + [mul]


def match_gain(value: ir.Value, nodes: list[ir.Node]):
    """Trailing [Cast] → [Mul(gain)] → [Cast] after the normalized value.

    Returns (output, gain or None, gain_node, pre_gain)."""
    gain = gain_node = pre_gain = None
    while True:
        node = _only_user(value, "Cast", "Mul")
        if node is None:
            break
        if op(node, "Mul", domain=""):
            if gain_node is not None:
                break
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            g = const_array(other)
            if g is None or (g.size > 1 and g.shape[-1] != g.size):   # gain must run along the last axis
                break
            gain, gain_node, pre_gain = g.reshape(-1), node, value
        nodes.append(node)
        value = node.outputs[0]
    return value, gain, gain_node, pre_gain


class DecomposedRMSNorm:
    """Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains from torch's exporters (both)."""

    kind = "rms"
    form = "decomposed"
    anchors = ("ReduceMean",)

    def match(self, reduce: ir.Node) -> Site | Miss | None:
        found = match_inverse_rms(reduce)
        if found is None:
            return None
        if isinstance(found, str):
            return Miss(reduce, self.kind, found, self.form)
        x, eps, normalized, nodes = found
        if centered_input(x) is not None:
            return None                                     # a LayerNorm's variance
        output, gain, gain_node, pre_gain = match_gain(normalized, nodes)
        if gain is not None and gain.dtype.kind != "f":
            return Miss(reduce, self.kind, "gain is not a float tensor", self.form)
        return Site(self.kind, self.form, reduce, x, output, eps,
                    gain=None if gain is None else np.asarray(gain),
                    nodes=tuple(nodes), gain_node=gain_node, pre_gain=pre_gain)
