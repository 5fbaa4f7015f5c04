"""Consumers that can absorb a norm's gain: linears on the normalized (last) axis.

A norm output may reach a MatMul/Gemm/FusedMatMul through Cast, Identity and Reshapes that
keep the last axis; `Shape` consumers only read the shape and are redirected. Anything else
is a reason not to rewrite, returned as a `Failure` naming the node at fault.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import Failure, Linear, Site, WeightRef, fail
from .graph import (attr, cast_to, const_array, const_tensor, dtype_of, exact_source, holds, is_cast, op,
                    through_casts, users)

# activation-side ops the normalized tensor may pass through on its way to a linear
TRANSPARENT = ("Cast", "CastLike", "Identity", "Reshape")


def resolve_weight(value: ir.Value, transposed: bool) -> WeightRef | None:
    """Follow Transpose/Cast/Identity of a constant up to the stored tensor."""
    steps: list[tuple[str, object]] = []
    while True:
        tensor = const_tensor(value)
        if tensor is not None:
            if len(tensor.shape) != 2:
                return None
            return WeightRef(value, tensor, tuple(reversed(steps)), transposed)
        node = value.producer()
        if op(node, "Transpose", domain=""):
            steps.append(("transpose", tuple(attr(node, "perm", (1, 0)))))
        elif is_cast(node) and cast_to(node) is not None:
            steps.append(("cast", cast_to(node).numpy()))
        elif not op(node, "Identity", domain=""):
            return None
        value = node.inputs[0]


def _bias_after(node: ir.Node) -> tuple[ir.Value | None, ir.Node | None]:
    out = node.outputs[0]
    uses = users(out)
    if len(uses) == 1 and op(uses[0][0], "Add", domain="") and not out.is_graph_output():
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        c = const_array(other)
        if c is not None and c.ndim <= 1:
            return other, add
    return None, None


# Linears over quantized weights: a gain cannot be folded into block-quantized or integer weights
# exactly (each block's scale and rounding would change). Rewrite the float model, then quantize.
QUANTIZED = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
             "DynamicQuantizeLinear", "QuantizeLinear", "QGemm", "MatMulBnb4", "GatherBlockQuantized"}
QUANTIZED_REASON = ("weights are quantized ({what}): a gain cannot be folded into them exactly — rewrite "
                    "the float model, then quantize it (README: Quantized models)")


def _linear(node: ir.Node, index: int, path: tuple[ir.Node, ...]) -> Linear | Failure:
    if node.op_type in QUANTIZED:
        return fail(QUANTIZED_REASON.format(what=f"consumer {node.op_type}"), node)
    if not op(node, "MatMul", "Gemm", domain="") and not op(node, "FusedMatMul", domain="com.microsoft"):
        return fail(f"consumer {node.op_type} is not a linear on the normalized axis", node)
    if index != 0:
        return fail(f"{node.op_type} reads the normalized tensor as its weight", node)
    if op(node, "MatMul", domain=""):
        transposed = False
    elif op(node, "Gemm", domain=""):
        if attr(node, "transA", 0):
            return fail("Gemm with transA=1 (normalized axis is not the contraction axis)", node)
        transposed = bool(attr(node, "transB", 0))
    elif op(node, "FusedMatMul", domain="com.microsoft"):
        if attr(node, "transA", 0) or attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
            return fail("FusedMatMul with transposed A", node)
        transposed = bool(attr(node, "transB", 0))
    else:
        return fail(f"consumer {node.op_type} is not a linear on the normalized axis", node)
    ref = resolve_weight(node.inputs[1], transposed)
    if ref is None:
        if op(through_casts(node.inputs[1]).producer(), "DequantizeLinear"):
            return fail(QUANTIZED_REASON.format(what=f"{node.op_type} weight from DequantizeLinear, QDQ"), node)
        return fail(f"{node.op_type} weight is not a constant 2-D tensor", node.inputs[1])
    if op(node, "Gemm", domain="") and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        if const_array(c) is None:
            return fail("Gemm bias is not constant", c)
        return Linear(node, ref, path, bias=c)
    bias, add = _bias_after(node)
    return Linear(node, ref, path, bias=bias, bias_add=add)


def _keeps_last_axis(node: ir.Node, n: int | None) -> bool:
    if is_cast(node):
        return cast_to(node) in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                                 ir.DataType.DOUBLE)
    if op(node, "Identity", domain=""):
        return True
    if op(node, "Reshape", domain="") and n is not None:
        # rows may be merged or split, the last axis must stay whole: [.., n] → [.., n]
        target = const_array(node.inputs[1])
        if target is not None:
            return target.size >= 1 and int(target[-1]) == n
        src, dst = node.inputs[0].shape, node.outputs[0].shape
        return bool(src and dst) and src[-1] == n and dst[-1] == n
    return False


def match_linears(value: ir.Value, n: int | None, graph: ir.Graph | None = None):
    """All linears reading `value` (a value of `graph`) -> (linears, shape_users) or the
    Failure. A reader inside a subgraph (an If/Loop body reading the outer value) is refused:
    the rewrite and the scale walker work on one graph."""
    if value.is_graph_output():
        return fail("norm output is a graph output", value)
    linears: list[Linear] = []
    shape_users: list[tuple[ir.Node, int]] = []
    graph = graph or (value.producer().graph if value.producer() is not None else None)

    def walk(v: ir.Value, path: tuple[ir.Node, ...]) -> Failure | None:
        if v.is_graph_output():
            return fail("norm output reaches a graph output", v)
        for node, index in users(v):
            if node.graph is not graph:
                return fail(f"{node.op_type} inside a subgraph (If/Loop body) reads the normalized tensor", node)
            if op(node, "Shape", domain=""):
                shape_users.append((node, index))     # reads only the shape, which is kept
            elif op(node, *TRANSPARENT, domain="") and index == 0:
                if not _keeps_last_axis(node, n):
                    return fail(f"{node.op_type} changes the normalized axis or dtype", node)
                failure = walk(node.outputs[0], path + (node,))
                if failure:
                    return failure
            else:
                found = _linear(node, index, path)
                if isinstance(found, Failure):
                    return found
                if n is not None and found.weight.tensor.shape[
                        1 if found.weight.transposed ^ _transposes(found.weight) else 0] != n:
                    return fail(f"{node.op_type} weight does not contract the normalized axis", node)
                linears.append(found)
        return None

    failure = walk(value, ())
    if failure:
        return failure
    if not linears:
        return fail("no linear consumer", value)
    return linears, shape_users


def defer_blocker(site: Site) -> Failure | None:
    """Why deferring would not be exact, or None. Deferring feeds the raw input x to the linears
    in the types the normalized tensor had on its way to them: each must hold x exactly —
    a narrowing Cast (fp32 → fp16/bf16, autocast graphs) would give the un-normalized x a wider
    range than the original ever had in that type."""
    x = site.skip_inputs[0] if site.skip_inputs else site.x
    if x is None:
        return fail("the norm's input is unknown", site.anchor)
    source = dtype_of(exact_source(x))
    steps: list[tuple[str, ir.DataType | None, ir.Node | ir.Value]] = [
        ("the norm's output", dtype_of(site.output), site.output)]
    for linear in site.linears:
        steps += [(f"a {node.op_type}", cast_to(node), node) for node in linear.path if is_cast(node)]
    for where, dtype, at in steps:
        if not holds(dtype, source):
            names = (getattr(source, "name", "?"), getattr(dtype, "name", "?"))
            return fail(f"{where} narrows the {names[0]} input to {names[1]} (the raw input would lose range)", at)
    return None


def _transposes(ref: WeightRef) -> bool:
    """Whether the Transpose steps swap the stored tensor's two axes."""
    flips = sum(1 for kind, perm in ref.steps if kind == "transpose" and tuple(perm) == (1, 0))
    return flips % 2 == 1


def weight_dtype(linear: Linear) -> ir.DataType:
    return dtype_of(linear.node.inputs[1]) or linear.weight.tensor.dtype


__all__ = ["Linear", "WeightRef", "defer_blocker", "match_linears", "resolve_weight", "weight_dtype"]
