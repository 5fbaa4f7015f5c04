"""The scale algebra: what a per-row scale s^p does at each op (RULES).

After a deferred norm, each linear's output is known to equal s^p ⊙ T (s = 1/RMS of the norm's
input, one value per row, always > 0). The walker (rewriter/scale_walker.py) moves the factor
downstream while the op it meets provably lets it through; this module says which ops do.

A state (`Scaled`) records the factor, its degree p, and `rows`: the value's axes along which
the factor varies (the scale tensor has the value's rank, size 1 on every other axis). Each op
kind has one rule in RULES: the condition under which the factor passes and the state of each
output. An op without a rule, or whose condition cannot be proven from the graph (unknown
rank, perm, axes or shapes), passes nothing: the factor is applied before it. A factor never
passes a narrowing Cast: the un-normalized tensor must not be moved into a type with less range
or precision.

RoPE's rotate-half (Slice, Neg, Concat, Mul by cos/sin, Add) and the GLU product are not special
cases: they are these rules meeting the ops they are made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import (attr, cast_to, const_array, const_tensor, dtype_of, holds,
                                     rank_of, slice_axes)

D = ir.DataType


@dataclass(frozen=True)
class Scaled:
    """value = scale^degree ⊙ T, with `scale` (fp32) laid out to broadcast against the value:
    same rank, size 1 off `rows` (None: rank unknown, so no rule needing axes applies)."""

    scale: ir.Value
    degree: float
    rows: tuple[int, ...] | None

    def same_factor(self, other: "Scaled | None") -> bool:
        return other is not None and other.scale is self.scale and other.degree == self.degree

    def with_degree(self, degree: float) -> "Scaled | None":
        return None if degree == 0 else Scaled(self.scale, degree, self.rows)


Outs = "list[Scaled | None] | None"      # a state per output, or None: apply before the node
Rule = Callable[[object, ir.Node, list], Outs]   # (the walker: its `edit` makes moved scales, node, states)


# -- conditions -----------------------------------------------------------------------------------

def axis_at(axis: int, rank: int | None) -> int | None:
    """`axis` counted from the start (None: out of range, or negative with the rank unknown)."""
    if rank is None:
        return axis if axis >= 0 else None
    return axis + rank if -rank <= axis < 0 else axis if 0 <= axis < rank else None


def _off_rows(axes, state: Scaled, rank: int | None) -> bool:
    """Every axis in `axes` is a feature axis: the factor is constant along it."""
    if state.rows is None:
        return False
    normalized = [axis_at(int(a), rank) for a in axes]
    return all(a is not None and a not in state.rows for a in normalized)


def _only(ins, *indices) -> bool:
    """Only inputs at `indices` carry a factor."""
    return all(s is None for i, s in enumerate(ins) if i not in indices)


def _same_rank(node: ir.Node, index: int) -> bool:
    """The output has the rank of input `index`: broadcasting adds no leading axis (which would
    move the rows)."""
    out_rank, in_rank = rank_of(node.outputs[0]), rank_of(node.inputs[index])
    if out_rank is not None and in_rank is not None:
        return out_rank == in_rank
    if in_rank is None:
        return False
    for i, other in enumerate(node.inputs):
        if i == index or other is None:
            continue
        other_rank = rank_of(other)
        if other_rank is None:
            tensor = const_tensor(other)
            c = const_array(other) if tensor is None or tensor.size < 2**16 else None
            other_rank = None if c is None else c.ndim
        if other_rank is None or other_rank > in_rank:
            return False
    return True


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _scalar(value: ir.Value | None) -> float | None:
    c = const_array(value)
    return None if c is None or c.size != 1 else float(c.reshape(()))


# -- the rules: one per op kind -------------------------------------------------------------------

def unary(w, node, ins) -> Outs:
    """f(s·t) = s·f(t) for positively homogeneous f (s > 0); extra outputs (a mask) unscaled."""
    return [ins[0]] + [None] * (len(node.outputs) - 1) if ins[0] and _only(ins, 0) else None


def cast(w, node, ins) -> Outs:
    """Exact only when it widens (or keeps) the type: never a wider range in a narrower type."""
    return [ins[0]] if ins[0] and _only(ins, 0) and holds(cast_to(node), dtype_of(node.inputs[0])) else None


def _degree_fits(node: ir.Node, degree: float) -> bool:
    """In fp16/bf16 a factor passes only while its degree stays within ±1: t^p (or t·u) of the
    un-normalized t can leave the narrow type's range where the original's y^p does not."""
    narrow = dtype_of(node.outputs[0]) in (D.FLOAT16, D.BFLOAT16)
    return not narrow or abs(degree) <= 1


def mul(w, node, ins) -> Outs:
    """(s^a·t)(s^b·u) = s^(a+b)·tu; (s^a·t)·u = s^a·(tu) when u adds no leading axis."""
    a, b = ins[0], ins[1]
    if a and b:
        ok = a.scale is b.scale and _degree_fits(node, a.degree + b.degree)
        return [a.with_degree(a.degree + b.degree)] if ok else None
    index = 0 if a else 1
    return [a or b] if _same_rank(node, index) else None


def div(w, node, ins) -> Outs:
    """(s^a·t)/(s^b·u) = s^(a−b)·(t/u); either side may be unscaled."""
    a, b = ins[0], ins[1]
    if a and b:
        return [a.with_degree(a.degree - b.degree)] if a.scale is b.scale else None
    index = 0 if a else 1
    if not _same_rank(node, index):
        return None
    return [a] if a else [b.with_degree(-b.degree)]


def same_factor(w, node, ins) -> Outs:
    """s^a·t + s^a·u = s^a·(t+u): every operand carries the same factor (an unscaled term or a
    bias stops it), and no operand adds a leading axis."""
    first = ins[0]
    if first is None or not all(first.same_factor(s) for s in ins):
        return None
    return [first] if all(_same_rank(node, i) for i in range(len(ins))) else None


def power(w, node, ins) -> Outs:
    """(s^a·t)^e = s^(a·e)·t^e for a constant scalar e (s > 0)."""
    e = _scalar(node.inputs[1])
    if not ins[0] or not _only(ins, 0) or e is None or not _same_rank(node, 0):
        return None
    return [ins[0].with_degree(ins[0].degree * e)] if _degree_fits(node, ins[0].degree * e) else None


def matmul(w, node, ins) -> Outs:
    """(s·A)·W = s·(A·W) for a constant W when the contracted (last) axis of A is no row axis and
    the rows keep their positions (no broadcast batch axes added)."""
    state, rank = ins[0], rank_of(node.inputs[0])
    if not state or not _only(ins, 0) or state.rows is None or rank is None or rank < 2:
        return None
    weight = const_tensor(node.inputs[1])
    if weight is None or len(weight.shape) != 2 or rank - 1 in state.rows:
        return None
    return [state] if rank_of(node.outputs[0]) in (None, rank) else None


def transpose(w, node, ins) -> Outs:
    """The rows move with the permutation; the factor is transposed alike."""
    state, rank = ins[0], rank_of(node.inputs[0])
    if not state or state.rows is None:
        return None
    perm = attr(node, "perm")
    perm = list(range(rank - 1, -1, -1)) if perm is None and rank is not None else perm
    if perm is None or sorted(perm) != list(range(len(perm))) or (rank is not None and len(perm) != rank):
        return None
    scale = w.edit.op1("Transpose", state.scale, perm=list(perm), hint="scale_t")
    return [Scaled(scale, state.degree, tuple(sorted(list(perm).index(r) for r in state.rows)))]


def reshape(w, node, ins) -> Outs:
    """Rows that are an unchanged prefix of the shape (same leading dims before and after) stay
    rows: each row's elements stay together. Anything else (rows merged into features, a
    moved or unknown axis) stops the factor."""
    state = ins[0]
    if not state or not _only(ins, 0) or state.rows is None:
        return None
    src, dst = node.inputs[0].shape, node.outputs[0].shape
    k = len(state.rows)
    if src is None or dst is None or state.rows != tuple(range(k)) or len(dst) <= k or len(src) <= k:
        return None             # a row axis must not become the last (or only) axis
    if not all(_same_dim(src[i], dst[i]) for i in range(k)):
        return None
    shape = w.edit.initializer(np.array([0] * k + [1] * (len(dst) - k), np.int64), "scale_shape")
    scale = w.edit.op1("Reshape", state.scale, shape, hint="scale_r")
    return [Scaled(scale, state.degree, state.rows)]


def slice_(w, node, ins) -> Outs:
    """Slicing feature axes keeps every row's factor."""
    state = ins[0]
    if not state or not _only(ins, 0):
        return None
    axes = slice_axes(node)
    ok = axes is not None and _off_rows(axes, state, rank_of(node.inputs[0]))
    return [state] if ok else None


def split(w, node, ins) -> Outs:
    """Splitting along a feature axis: every part keeps the factor."""
    state = ins[0]
    ok = state and _only(ins, 0) and _off_rows([attr(node, "axis")], state, rank_of(node.inputs[0]))
    return [state] * len(node.outputs) if ok else None


def concat(w, node, ins) -> Outs:
    """Joining parts with the same factor along a feature axis."""
    first = ins[0]
    if first is None or not all(first.same_factor(s) for s in ins):
        return None
    return [first] if _off_rows([attr(node, "axis")], first, rank_of(node.inputs[0])) else None


def rotary(w, node, ins) -> Outs:
    """RotaryEmbedding (ONNX opset 23, ORT contrib) rotates pairs within the last axis, per
    position: linear in x when the last axis is no row axis."""
    state, rank = ins[0], rank_of(node.inputs[0])
    if not state or not _only(ins, 0) or state.rows is None or rank is None or rank - 1 in state.rows:
        return None
    return [state] if rank_of(node.outputs[0]) == rank else None


RULES: dict[str, Rule] = {
    "Identity": unary,          # s·t
    "Neg": unary,               # −(s·t) = s·(−t)
    "Relu": unary,              # relu(s·t) = s·relu(t), s > 0
    "LeakyRelu": unary,         # positively homogeneous
    "Abs": unary,               # |s·t| = s·|t|, s > 0
    "Dropout": unary,           # (s·t)⊙m/(1−p) = s·(t⊙m/(1−p))
    "Cast": cast,               # exact widening only
    "CastLike": cast,           # the same, its type from a second input
    "Mul": mul,                 # degrees add
    "Div": div,                 # degrees subtract
    "Add": same_factor,         # s·t + s·u = s·(t+u)
    "Sub": same_factor,         # s·t − s·u = s·(t−u)
    "Sum": same_factor,         # Σ s·tᵢ = s·Σ tᵢ
    "Pow": power,               # (s·t)^e = s^e·t^e
    "MatMul": matmul,           # (s·A)W = s·(AW), rows not contracted
    "Transpose": transpose,     # rows permuted with the axes
    "Reshape": reshape,         # rows an unchanged prefix
    "Slice": slice_,            # feature axes only
    "Split": split,             # feature axis only
    "Concat": concat,           # same factor, feature axis
    "RotaryEmbedding": rotary,  # per-position rotation of the last axis
}
CONTRIB_RULES = {"RotaryEmbedding"}      # ORT's com.microsoft ops with the ONNX op's algebra


def rule_for(node: ir.Node) -> Rule | None:
    if node.domain in ("", "ai.onnx") or (node.domain == "com.microsoft" and node.op_type in CONTRIB_RULES):
        return RULES.get(node.op_type)
    return None
