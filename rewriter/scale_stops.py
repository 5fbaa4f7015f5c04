"""Where a deferred scale stops although the algebra (rewriter/scale.py) would let it pass:
at x of an x·f(x) activation (SiLU, GELU), so the pattern onnxruntime fuses (QuickGelu, Gelu,
FastGelu) stays whole; at the output of a projection bound for attention, where pushing it
saves nothing and would sit inside the rotary and attention patterns onnxruntime fuses; and,
with --approx, whether it may cancel in a following norm."""

from __future__ import annotations

import onnx_ir as ir

from rewriter.patterns.graph import const_tensor, op, rank_of, users
from rewriter.scale import axis_at

# Gates of x·f(x) activations (SiLU, GELU): a scale stops at them
NONLINEAR_GATES = ("Sigmoid", "Tanh", "Erf", "HardSigmoid", "Softplus")
GATE_PATH = ("Mul", "Div", "Add", "Pow", "Cast", "Identity")   # the arithmetic around a gate
# what lies between a projection and attention: head layout and rotary embedding
ATTENTION_PATH = ("Reshape", "Transpose", "Slice", "Split", "Concat", "Neg", "Mul", "Add", "Sub", "Cast",
                  "CastLike", "Identity", "Unsqueeze", "Squeeze", "RotaryEmbedding")
ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention")

Edge = tuple[ir.Node, ir.Value]      # (reader, the value it reads): a scale is applied on it


def _reaches(value: ir.Value, depth: int, path_ops, is_target) -> bool:
    """Some reader within `depth` ops of `value`, through ops in `path_ops`, is a target."""
    frontier, seen = [value], set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for reader, _ in users(v):
                if is_target(reader):
                    return True
                if reader not in seen and reader.op_type in path_ops and reader.domain in ("", "ai.onnx", "com.microsoft"):
                    seen.add(reader)
                    nxt.extend(reader.outputs)
        frontier = nxt
    return False


def activation_stops(graph: ir.Graph, depth: int = 6) -> set[Edge]:
    """x·f(x) activations (SiLU = x·σ(x), GELU = x·½(1+erf(x/√2)) or its tanh form): a
    scale arriving at x is applied once, at x, for all of x's readers — not somewhere
    inside f — so the pattern onnxruntime fuses (QuickGelu, Gelu, FastGelu) stays intact.
    Same number of Muls on big tensors. x: a value with several readers, one of which
    reaches a nonlinear gate within `depth` ops."""
    edges: set[Edge] = set()
    for node in graph:
        for value in node.outputs:
            readers = users(value)
            if len(readers) > 1 and reaches_gate(value, depth):
                edges.update((reader, value) for reader, _ in readers)
    return edges


def attention_stops(seeds, depth: int = 16) -> set[Edge]:
    """A scale bound for attention (q, k or v reaching a MatMul of two activations, or an
    attention op, through head layout and RoPE) is applied at the projection's output:
    pushing it there saves nothing — the tensor is as big — and it would sit inside the
    patterns onnxruntime fuses (rotary embedding, attention). `seeds`: the linears' outputs."""
    edges: set[Edge] = set()
    for seed in seeds:
        if reaches_attention(seed, depth):
            edges.update((reader, seed) for reader, _ in users(seed))
    return edges


def reaches_attention(value: ir.Value, depth: int) -> bool:
    return _reaches(value, depth, ATTENTION_PATH, lambda reader: reader.op_type in ATTENTION_OPS or (
        op(reader, "MatMul", domain="") and all(const_tensor(i) is None for i in reader.inputs)))


def reaches_gate(value: ir.Value, depth: int) -> bool:
    return _reaches(value, depth, GATE_PATH, lambda reader: op(reader, *NONLINEAR_GATES, domain=""))


def cancel_blocker(cancels: dict, node: ir.Node, edges) -> str:
    """Why the scales on `edges` ((value, state) read by a norm's `node`) do not cancel in
    it, or '': each must be constant over exactly the normalized axes (`cancels[(node, value)]`)
    — none of them a row axis, the rank known (off its rows the scale has size 1, so it
    broadcasts over them)."""
    for value, state in edges:
        rank, axes = rank_of(value), cancels[(node, value)]
        if state.rows is None or rank is None:
            return f"the rank of {value.name!r} is unknown: where its scale varies is not known"
        moved = [a for a in axes if axis_at(a, rank) in (None, *state.rows)]
        if moved:
            return (f"the norm normalizes {value.name!r} over axis {moved[0]}, along which the scale "
                    f"varies (row axes {list(state.rows)})")
    return ""
