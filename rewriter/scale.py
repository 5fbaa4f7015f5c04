"""The scale algebra: a per-row scale s^p travelling through the graph.

After a deferred norm, each linear's output is known to equal s^p ⊙ T (s = 1/RMS of the norm's
input, one value per row, always > 0). Instead of multiplying right away, the walker moves the
factor downstream while the op it meets provably lets it through, and applies it (one Mul) on
the edge into the first op that does not — as late as the algebra allows.

A state (`Scaled`) records the factor, its degree p, and `rows`: the value's axes along which
the factor varies (the scale tensor has the value's rank, size 1 on every other axis). Each op
kind has one rule in RULES: the condition under which the factor passes and the state of each
output. An op without a rule, or whose condition cannot be proven from the graph (unknown
rank, perm, axes or shapes), passes nothing: the factor is applied before it. Values read
inside a subgraph (If/Loop/Scan bodies read outer values without listing them as inputs) get
the factor applied where they leave the main graph. A factor never passes a narrowing Cast: the
un-normalized tensor must not be moved into a type with less range or precision.

RoPE's rotate-half (Slice, Neg, Concat, Mul by cos/sin, Add) and the GLU product are not special
cases: they are these rules meeting the ops they are made of. x·f(x) activations (SiLU, GELU)
get the factor once, at x, so the pattern onnxruntime fuses (QuickGelu, FastGelu) stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import (GraphEditor, attr, cast_to, const_array, const_tensor, dtype_of, holds,
                                     op, rank_of, reads_type_only, set_dtype, slice_axes, users)

D = ir.DataType
# Gates of x·f(x) activations (SiLU, GELU): a scale stops at them
NONLINEAR_GATES = ("Sigmoid", "Tanh", "Erf", "HardSigmoid", "Softplus")
GATE_PATH = ("Mul", "Div", "Add", "Pow", "Cast", "Identity")   # the arithmetic around a gate
# what lies between a projection and attention: head layout and rotary embedding
ATTENTION_PATH = ("Reshape", "Transpose", "Slice", "Split", "Concat", "Neg", "Mul", "Add", "Sub", "Cast",
                  "CastLike", "Identity", "Unsqueeze", "Squeeze", "RotaryEmbedding")
ATTENTION_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention")


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
Rule = Callable[["ScaleWalker", ir.Node, list], Outs]


# -- conditions -----------------------------------------------------------------------------------

def _axis(axis: int, rank: int | None) -> int | None:
    if rank is None:
        return axis if axis >= 0 else None
    return axis + rank if -rank <= axis < 0 else axis if 0 <= axis < rank else None


def _off_rows(axes, state: Scaled, rank: int | None) -> bool:
    """Every axis in `axes` is a feature axis: the factor is constant along it."""
    if state.rows is None:
        return False
    normalized = [_axis(int(a), rank) for a in axes]
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


@dataclass(frozen=True)
class Step:
    """One op a factor met: the scaled inputs it read and what the algebra did there."""

    node: ir.Node | None            # None: a graph output
    scaled: tuple[ir.Value, ...]
    verdict: str
    passed: bool


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


class ScaleWalker:
    def __init__(self, graph: ir.Graph, edit: GraphEditor, take_output_slot, push: bool = True):
        self.graph = graph
        self.push = push        # False: apply every scale right after its linear
        # --approx: (node, input) → the axes that norm normalizes over, for each edge through
        # which a following norm reads its input; a scale reaching them is dropped where it is
        # constant over those axes: RMSNorm(s·t) = RMSNorm(t) up to ε (Prop. 3)
        self.cancels: dict[tuple[ir.Node, ir.Value], tuple[int, ...]] = {}
        self.cancelled: set[ir.Value] = set()      # norm inputs where a scale was dropped
        self.kept: dict[ir.Value, str] = {}        # norm inputs where it could not be: why
        self.stops: set[ir.Node] = set()
        self.stop_edges: set[tuple[ir.Node, ir.Value]] = set()   # apply the scale on these edges
        self.edit = edit
        self.take_output_slot = take_output_slot
        self.states: dict[ir.Value, Scaled] = {}
        self._applied: dict[ir.Value, ir.Value] = {}
        self._factor: dict[tuple, ir.Value] = {}
        self.muls = 0
        self.trace: list[Step] = []     # every op a factor met, in graph order (`explain` prints it)

    def stop_at(self, nodes) -> None:
        """Apply any scale before these nodes (a norm's readers: one Mul on its input)."""
        self.stops.update(nodes)

    def cancel_in(self, norm_input: ir.Value, readers, axes: tuple[int, ...]) -> None:
        """Let the scale cancel in the norm whose nodes `readers` read `norm_input`, normalizing
        it over `axes` — only where the scale is constant over them (`cancel_blocker`)."""
        self.cancels.update(((node, norm_input), tuple(axes)) for node in readers)

    def cancel_blocker(self, node: ir.Node, edges) -> str:
        """Why the scales on `edges` ((value, state) read by a norm's `node`) do not cancel in
        it, or '': each must be constant over exactly the normalized axes — none of them a row
        axis, the rank known (off its rows the scale has size 1, so it broadcasts over them)."""
        for value, state in edges:
            rank, axes = rank_of(value), self.cancels[(node, value)]
            if state.rows is None or rank is None:
                return f"the rank of {value.name!r} is unknown: where its scale varies is not known"
            moved = [a for a in axes if _axis(a, rank) is None or _axis(a, rank) in state.rows]
            if moved:
                return (f"the norm normalizes {value.name!r} over axis {moved[0]}, along which the scale "
                        f"varies (row axes {list(state.rows)})")
        return ""

    def seed(self, value: ir.Value, scale: ir.Value) -> None:
        rank = rank_of(value)
        self.states[value] = Scaled(scale, 1.0, None if rank is None else tuple(range(rank - 1)))

    def protect_activations(self, depth: int = 6) -> None:
        """x·f(x) activations (SiLU = x·σ(x), GELU = x·½(1+erf(x/√2)) or its tanh form): a
        scale arriving at x is applied once, at x, for all of x's readers — not somewhere
        inside f — so the pattern onnxruntime fuses (QuickGelu, Gelu, FastGelu) stays intact.
        Same number of Muls on big tensors. x: a value with several readers, one of which
        reaches a nonlinear gate within `depth` ops."""
        for node in self.graph:
            for value in node.outputs:
                readers = users(value)
                if len(readers) > 1 and self._reaches_gate(value, depth):
                    self.stop_edges.update((reader, value) for reader, _ in readers)

    def protect_attention(self, depth: int = 16) -> None:
        """A scale bound for attention (q, k or v reaching a MatMul of two activations, or an
        attention op, through head layout and RoPE) is applied at the projection's output:
        pushing it there saves nothing — the tensor is as big — and it would sit inside the
        patterns onnxruntime fuses (rotary embedding, attention)."""
        for seed in list(self.states):
            if self._reaches_attention(seed, depth):
                self.stop_edges.update((reader, seed) for reader, _ in users(seed))

    @staticmethod
    def _reaches_attention(value: ir.Value, depth: int) -> bool:
        return _reaches(value, depth, ATTENTION_PATH, lambda reader: reader.op_type in ATTENTION_OPS or (
            op(reader, "MatMul", domain="") and all(const_tensor(i) is None for i in reader.inputs)))

    @staticmethod
    def _reaches_gate(value: ir.Value, depth: int) -> bool:
        return _reaches(value, depth, GATE_PATH, lambda reader: op(reader, *NONLINEAR_GATES, domain=""))

    # -- propagation ----------------------------------------------------------------------
    def run(self) -> None:
        self.graph.sort()
        if self.push:
            self.protect_activations()
            self.protect_attention()
        nodes = list(self.graph)        # the graph's own nodes: the walker's Muls are not walked
        for value, state in list(self.states.items()):
            self._apply_in_subgraphs(value, state)
        for node in nodes:
            ins = [self.states.get(v) if v is not None and not reads_type_only(node, i) else None
                   for i, v in enumerate(node.inputs)]
            scaled = tuple(v for v, st in zip(node.inputs, ins) if st is not None)
            for index, (value, state) in enumerate(zip(node.inputs, ins)):
                if state is not None and (node, value) in self.stop_edges:
                    self.trace.append(Step(node, (value,), "applied at x of an x·f(x) activation "
                                           "(kept whole for onnxruntime's fusion)", False))
                    node.replace_input_with(index, self.apply(value, state))
                    ins[index] = None
            if not any(ins):
                continue
            edges = [(v, st) for v, st in zip(node.inputs, ins) if st is not None]
            if all((node, v) in self.cancels for v, _ in edges):
                blocker = self.cancel_blocker(node, edges)
                if not blocker:
                    self.cancelled.update(v for v, _ in edges)
                    self.trace.append(Step(node, scaled, "cancels in this norm (--approx)", False))
                    continue            # the norm reads the raw tensor; its output is unscaled
                self.kept.update((v, f"{node.op_type} node {node.name!r}: {blocker}") for v, _ in edges)
                self.trace.append(Step(node, scaled, f"applied before it: --approx cannot cancel it: {blocker}", False))
                self._apply_before(node, ins)
                continue
            outs = self.rule(node, ins)
            if outs is not None and any(out in self.states for out in node.outputs):
                outs = None         # a linear of another deferred norm: its own scale is seeded here
            if outs is None:
                self.trace.append(Step(node, scaled, "applied before it: " + self.why_not(node), False))
                self._apply_before(node, ins)
                continue
            self.trace.append(Step(node, scaled, f"passes (rule {rule_for(node).__name__})", True))
            for value, state in zip(node.outputs, outs):
                if state is not None:
                    self.states[value] = state
                    self._apply_in_subgraphs(value, state)
        for value in list(self.graph.outputs):
            if value in self.states:
                self.trace.append(Step(None, (value,), "applied before the graph output", False))
                applied = self.apply(value, self.states[value])
                self.take_output_slot(value, applied)

    def _apply_before(self, node: ir.Node, ins: list[Scaled | None]) -> None:
        for index, state in enumerate(ins):
            if state is not None:
                node.replace_input_with(index, self.apply(node.inputs[index], state))

    def rule(self, node: ir.Node, ins: list[Scaled | None]) -> list[Scaled | None] | None:
        """Output states when the scale passes `node`, None when it must be applied before."""
        if not self.push or node in self.stops:
            return None
        found = rule_for(node)
        return None if found is None else found(self, node, ins)

    def why_not(self, node: ir.Node) -> str:
        """Why the factor does not pass `node` (for the trace)."""
        if not self.push:
            return "--no-push"
        if node in self.stops:
            return "a norm reads it (applied once, before the norm)"
        if any(out in self.states for out in node.outputs):
            return "a linear of another deferred norm"
        found = rule_for(node)
        if found is None:
            return f"no rule for {node.op_type}" + (f" ({node.domain})" if node.domain else "")
        return f"rule {found.__name__} does not prove it: {found.__doc__.split(chr(10))[0].strip()}"

    def _apply_in_subgraphs(self, value: ir.Value, state: Scaled) -> None:
        """A subgraph (If/Loop/Scan body) reading `value` from the outer scope gets it with its
        factor applied: the walker never enters subgraphs."""
        for node, index in users(value):
            if node.graph is not self.graph:
                self.trace.append(Step(node, (value,), "applied before it: it reads the value inside a "
                                       "subgraph (If/Loop body)", False))
                node.replace_input_with(index, self.apply(value, state))

    # -- materialization ------------------------------------------------------------------
    def factor(self, state: Scaled, dtype: ir.DataType | None) -> ir.Value:
        key = (state.scale, state.degree, dtype)
        if key not in self._factor:
            f = state.scale
            if state.degree == 2:
                f = self.edit.op1("Mul", f, f, hint="scale_sq")
            elif state.degree == -1:
                f = self.edit.op1("Reciprocal", f, hint="scale_inv")
            elif state.degree != 1:
                exponent = self.edit.initializer(np.array(state.degree, (dtype_of(f) or D.FLOAT).numpy()), "degree")
                f = self.edit.op1("Pow", f, exponent)
            self._factor[key] = self.edit.cast(f, dtype) if dtype is not None else f
        return self._factor[key]

    def apply(self, value: ir.Value, state: Scaled) -> ir.Value:
        """value ⊙ scale^degree, made once per value."""
        if value not in self._applied:
            out = self.edit.op1("Mul", value, self.factor(state, dtype_of(value)), hint="deferred_scale")
            set_dtype(out, dtype_of(value))
            out.shape = value.shape
            self._applied[value] = out
            self.muls += 1
        return self._applied[value]
