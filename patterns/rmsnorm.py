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

from .base import Failure, Form, Miss, NormKind, Site, fail
from .graph import (attr, broadcast_scalar, const_array, is_float, op, rank_of, reduce_axes,
                    reshape_target, same_source, value_users)


DEFERRED = "1/RMS is not applied to its own input (a deferred scale: already rewritten)"


def _only_user(value: ir.Value, *op_types: str) -> ir.Node | None:
    uses = value_users(value)
    if len(uses) == 1 and op(uses[0][0], *op_types, domain="") and not value.is_graph_output():
        return uses[0][0]
    return None


def squared_input(node: ir.Node | None) -> ir.Value | None:
    """X for Pow(X, 2) or Mul(X, X)."""
    if op(node, "Pow", domain="") and broadcast_scalar(node.inputs[1], rank_of(node.inputs[0])) == 2.0:
        return node.inputs[0]
    if op(node, "Mul", domain="") and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def is_last_axis_reduce(node: ir.Node, x: ir.Value) -> bool:
    """A ReduceMean over the last axis only, keeping it (a per-row statistic)."""
    rank = rank_of(x)
    axes = reduce_axes(node, rank)
    return attr(node, "keepdims") == 1 and axes is not None and len(axes) == 1 and (
        axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def centered_input(x: ir.Value) -> ir.Value | None:
    """y when x = Sub(y, ReduceMean(y)) with the mean a per-row one: a LayerNorm, not an RMSNorm.
    A mean over other axes (all of them, or −2) is not a LayerNorm's centering."""
    sub = x.producer()
    if op(sub, "Sub", domain=""):
        mean = sub.inputs[1].producer()
        if op(mean, "ReduceMean", domain="") and same_source(mean.inputs[0], sub.inputs[0]) \
                and is_last_axis_reduce(mean, sub.inputs[0]):
            return sub.inputs[0]
    return None


def match_inverse_rms(reduce: ir.Node):
    """From the ReduceMean of squares to the normalized value.

    Returns (X, eps, normalized, nodes) or a Failure, or None when this is not a
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
        eps = broadcast_scalar(eps_value, rank_of(value))
        if eps is None:
            return fail("Add after the mean of squares is not a constant scalar ε (or it adds axes)", add)
        nodes.append(add)
        value = add.outputs[0]
    sqrt = _only_user(value, "Sqrt")
    if sqrt is None:
        return fail("mean of squares does not feed Sqrt", value)
    nodes.append(sqrt)
    root = sqrt.outputs[0]
    uses = value_users(root)
    if len(uses) != 1:
        return fail("1/RMS has several consumers", root)
    node, index = uses[0]
    if op(node, "Div", domain="") and index == 1:
        if broadcast_scalar(node.inputs[0], rank_of(root)) == 1.0:     # Div(1, sqrt) == Reciprocal
            inv = node
        elif same_source(node.inputs[0], x):              # Div(X, sqrt): normalized directly
            return x, eps, node.outputs[0], nodes + [node]
        else:
            return fail("Div by the RMS of another tensor", node)
    elif op(node, "Reciprocal", domain=""):
        inv = node
    else:
        return fail(f"RMS feeds {node.op_type}", node)
    nodes.append(inv)
    mul = _only_user(inv.outputs[0], "Mul")
    other = None if mul is None else mul.inputs[1] if mul.inputs[0] is inv.outputs[0] else mul.inputs[0]
    if other is None or not same_source(other, x):
        return fail(DEFERRED, mul or inv)
    return x, eps, mul.outputs[0], nodes + [mul]


def per_channel(c, rank: int | None) -> bool:
    """A float constant that varies along the last axis only and adds no axis when broadcast."""
    return c is not None and is_float(c.dtype) and (c.size == 1 or c.shape[-1] == c.size) \
        and c.ndim <= (1 if rank is None else rank)


def match_affine(value: ir.Value, nodes: list[ir.Node]):
    """Trailing [Cast] → [Mul(gain)] → [Cast] → [Add(β)] → [Cast] after the normalized value.

    Returns (output, gain or None, β or None, pre_affine) where pre_affine is the value
    before the first affine op (None when there is none)."""
    gain = beta = pre_affine = None
    while True:
        node = _only_user(value, "Cast", "CastLike", "Mul", "Add")
        if node is not None and node.op_type == "Mul" and (gain is not None or beta is not None):
            # a constant scalar after the gain (T5's tied head: · d_model^-0.5) scales γ and β
            c = const_array(node.inputs[1] if node.inputs[0] is value else node.inputs[0])
            if c is None or c.size != 1 or not per_channel(c, rank_of(value)):
                break
            factor = float(c.reshape(()))
            gain = (gain.astype(np.float64) if gain is not None else np.ones(1)) * factor
            beta = None if beta is None else beta.astype(np.float64) * factor
            nodes.append(node)
            value = node.outputs[0]
            continue
        if node is None or (node.op_type == "Add" and beta is not None):
            break
        if node.op_type in ("Mul", "Add"):
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            c = const_array(other)
            if not per_channel(c, rank_of(value)):
                break       # not a constant along the last axis
            pre_affine = value if pre_affine is None else pre_affine
            if node.op_type == "Mul":
                gain = c.reshape(-1)
            else:
                beta = c.reshape(-1)
        nodes.append(node)
        value = node.outputs[0]
    return value, gain, beta, pre_affine


def match_decomposed(reduce: ir.Node, kind: NormKind) -> Site | Miss | None:
    """The mean-of-squares chain shared by RMSNorm (squares of x) and LayerNorm (squares of
    x − mean(x)); `kind` says which one the caller wants."""
    squared = squared_input(reduce.inputs[0].producer())
    if squared is None:
        return None
    source = centered_input(squared)
    if (source is not None) != (kind == NormKind.LAYER):     # the other rule's norm
        return None
    found = match_inverse_rms(reduce)
    if found is None:
        return None
    if isinstance(found, Failure):
        return Miss(reduce, kind, found, Form.DECOMPOSED)
    x, eps, normalized, nodes = found
    if kind == NormKind.LAYER:                        # also own the mean and the Sub
        sub = x.producer()
        nodes = [sub.inputs[1].producer(), sub] + nodes
        x = source
    output, gain, beta, pre_affine = match_affine(normalized, nodes)
    if gain is None and beta is None:
        merged = match_group_merge(output, nodes)
        if merged is not None:
            merge, groups, (output, gain, beta, pre_affine) = merged
            return Site(kind, Form.DECOMPOSED, reduce, x, output, eps, gain=gain, beta=beta, nodes=tuple(nodes),
                        pre_affine=pre_affine, merge=merge, groups=groups)
    return Site(kind, Form.DECOMPOSED, reduce, x, output, eps, gain=gain, beta=beta,
                nodes=tuple(nodes), pre_affine=pre_affine)


def match_group_merge(value: ir.Value, nodes: list[ir.Node]):
    """Gated group norms (Mamba2's MambaRMSNormGated, n_groups G): normalized [.., G, n] →
    Reshape [.., G·n] → [Cast] → Mul(γ[G·n]). γ is per channel of the merged axis, so it folds
    into the linear that contracts it; 1/RMS is per group (defers only when G = 1).
    Returns (reshape, G, match_affine's result) or None."""
    merge = _only_user(value, "Reshape")
    shape = value.shape
    if merge is None or shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape[-2:]):
        return None
    groups, n = int(shape[-2]), int(shape[-1])
    target, out = reshape_target(merge), merge.outputs[0].shape
    last = int(target[-1]) if target is not None and target.size else \
        (out[-1] if out is not None and len(out) and isinstance(out[-1], int) else None)
    rank = target.size if target is not None else (len(out) if out is not None else None)
    if last != groups * n or rank != len(shape) - 1:
        return None
    merged_nodes = nodes + [merge]
    found = match_affine(merge.outputs[0], merged_nodes)
    if found[1] is None or found[1].size != groups * n:
        return None
    nodes[:] = merged_nodes
    return merge, groups, found


def match_sum_of_squares(reduce: ir.Node) -> Miss | None:
    """ReduceSumSquare → Add → Sqrt → Div/Reciprocal: the 1/RMS this rewriter emits for a
    deferred norm. Reported (a second run changes nothing), never rewritten."""
    value, chain = reduce.outputs[0], ("Add", "Sqrt", "Div", "Reciprocal")
    while (node := _only_user(value, *chain)) is not None:
        value, chain = node.outputs[0], chain[chain.index(node.op_type) + 1:]
        if node.op_type in ("Div", "Reciprocal"):
            mul = _only_user(value, "Mul")
            applied = mul is not None and any(same_source(v, reduce.inputs[0]) for v in mul.inputs)
            return Miss(reduce, NormKind.RMS, fail("sum-of-squares RMSNorm form not supported" if applied else DEFERRED, node),
                        Form.DECOMPOSED)
    return None


class DecomposedRMSNorm:
    """Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul chains from torch's exporters (both)."""

    kind = NormKind.RMS
    form = Form.DECOMPOSED
    anchors = ("ReduceMean", "ReduceSumSquare")

    def match(self, reduce: ir.Node) -> Site | Miss | None:
        if reduce.op_type == "ReduceSumSquare":
            return match_sum_of_squares(reduce)
        return match_decomposed(reduce, self.kind)
