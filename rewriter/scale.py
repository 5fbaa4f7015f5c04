"""The scale algebra: a per-row scale s^p travelling through the graph.

After a deferred norm, each linear's output is known to equal s ⊙ T (s = 1/RMS of the norm's
input, one value per row). Instead of multiplying right away, the walker moves the factor
downstream while the op it meets lets it through, and applies it (one Mul) on the edge into
the first op that does not — as late as the algebra allows:

    passes (degree kept)   Identity, Cast, Neg, Relu, LeakyRelu, Abs, Dropout, Mul by an unscaled
                           tensor, MatMul by a constant, Slice/Split/Concat along a non-row axis,
                           Transpose, Reshape that keeps the row axes as a prefix
    degrees combine        Mul of two tensors scaled by the same s (p₁+p₂), Pow(·, e) (p·e),
                           Add/Sub of two tensors with the same s and degree
    stops                  everything else: Add of an unscaled tensor or a bias, SiLU/GELU's
                           Sigmoid/Tanh/Erf, Softmax, MatMul of two activations, norms, outputs
    applied at x           x·f(x) activations (SiLU, GELU): the scale is applied once where x
                           branches, so the pattern onnxruntime fuses (QuickGelu, FastGelu) stays

RoPE's rotate-half (Slice, Neg, Concat, Mul by cos/sin, Add) and the GLU product are not
special cases: they are these rules meeting the ops they are made of. A fused RotaryEmbedding
op (ONNX opset 23, ORT contrib) is linear per position: the scale passes it whole. s > 0 always, which
is what makes ReLU (and any positively homogeneous op) pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rewriter.irtools import (GraphEditor, attr, const_array, const_tensor, dtype_of, op, rank_of,
                              set_dtype, users)

FLOAT_CASTS = {int(t) for t in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                                ir.DataType.DOUBLE)}
UNARY_HOMOGENEOUS = ("Identity", "Neg", "Relu", "LeakyRelu", "Abs", "Dropout")
# Gates of x·f(x) activations (SiLU, GELU): a scale stops at them
NONLINEAR_GATES = ("Sigmoid", "Tanh", "Erf", "HardSigmoid", "Softplus")
GATE_PATH = ("Mul", "Div", "Add", "Pow", "Cast", "Identity")   # the arithmetic around a gate


@dataclass(frozen=True)
class Scaled:
    """value = scale^degree ⊙ T, with `scale` (fp32) already laid out to broadcast against
    the value; `rows` are the value's axes the scale varies along (None: rank unknown)."""

    scale: ir.Value
    degree: float
    rows: tuple[int, ...] | None

    def same_factor(self, other: "Scaled | None") -> bool:
        return other is not None and other.scale is self.scale and other.degree == self.degree


def _axis(axis: int, rank: int | None) -> int | None:
    if axis >= 0:
        return axis
    return None if rank is None else axis + rank


def _off_rows(axes, state: Scaled, rank: int | None) -> bool:
    """All `axes` are feature axes (the scale is constant along them)."""
    if state.rows is None:
        return False
    normalized = [_axis(int(a), rank) for a in axes]
    return all(a is not None and a not in state.rows for a in normalized)


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


class ScaleWalker:
    def __init__(self, graph: ir.Graph, edit: GraphEditor, take_output_slot, push: bool = True):
        self.graph = graph
        self.push = push        # False: apply every scale right after its linear
        # --approx: (node, input) pairs through which a following RMSNorm reads its input;
        # a scale reaching them is dropped: RMSNorm(s·t) = RMSNorm(t) up to ε (Prop. 3)
        self.cancels: set[tuple[ir.Node, ir.Value]] = set()
        self.cancelled: set[ir.Value] = set()      # norm inputs where a scale was dropped
        self.stops: set[ir.Node] = set()
        self.stop_edges: set[tuple[ir.Node, ir.Value]] = set()   # apply the scale on these edges
        self.edit = edit
        self.take_output_slot = take_output_slot
        self.states: dict[ir.Value, Scaled] = {}
        self._applied: dict[ir.Value, ir.Value] = {}
        self._factor: dict[tuple, ir.Value] = {}
        self.muls = 0

    def stop_at(self, nodes) -> None:
        """Apply any scale before these nodes (a norm's readers: one Mul on its input)."""
        self.stops.update(nodes)

    def cancel_in(self, norm_input: ir.Value, readers) -> None:
        """Let the scale cancel in the RMSNorm whose nodes `readers` read `norm_input`."""
        self.cancels.update((node, norm_input) for node in readers)

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

    @staticmethod
    def _reaches_gate(value: ir.Value, depth: int) -> bool:
        frontier, seen = [value], set()
        for _ in range(depth):
            nxt = []
            for v in frontier:
                for reader, _ in users(v):
                    if op(reader, *NONLINEAR_GATES, domain=""):
                        return True
                    if reader not in seen and op(reader, *GATE_PATH, domain=""):
                        seen.add(reader)
                        nxt.extend(reader.outputs)
            frontier = nxt
        return False

    # -- propagation ----------------------------------------------------------------------
    def run(self) -> None:
        self.graph.sort()
        if self.push:
            self.protect_activations()
        for node in list(self.graph):
            ins = [self.states.get(v) if v is not None else None for v in node.inputs]
            for index, (value, state) in enumerate(zip(node.inputs, ins)):
                if state is not None and (node, value) in self.stop_edges:
                    node.replace_input_with(index, self.apply(value, state))
                    ins[index] = None
            if not any(ins):
                continue
            if any((node, v) in self.cancels for v, st in zip(node.inputs, ins) if st is not None) \
                    and all(st is None or (node, v) in self.cancels for v, st in zip(node.inputs, ins)):
                self.cancelled.update(v for v, st in zip(node.inputs, ins) if st is not None)
                continue            # the norm reads the raw tensor; its output is unscaled
            outs = self.rule(node, ins)
            if outs is not None and any(out in self.states for out in node.outputs):
                outs = None         # a linear of another deferred norm: its own scale is seeded here
            if outs is None:
                for index, state in enumerate(ins):
                    if state is not None:
                        node.replace_input_with(index, self.apply(node.inputs[index], state))
            else:
                for value, state in zip(node.outputs, outs):
                    if state is not None:
                        self.states[value] = state
        for value in list(self.graph.outputs):
            if value in self.states:
                applied = self.apply(value, self.states[value])
                self.take_output_slot(value, applied)

    def rule(self, node: ir.Node, ins: list[Scaled | None]) -> list[Scaled | None] | None:
        """Output states when the scale passes `node`, None when it must be applied before."""
        if not self.push or node in self.stops:
            return None
        kind = node.op_type
        first = ins[0]
        rank = rank_of(node.inputs[0])
        if kind == "RotaryEmbedding":     # ONNX (opset 23) and ORT: linear per position
            return [first] if first and not any(ins[1:]) and rank == rank_of(node.outputs[0]) else None
        if node.domain not in ("", "ai.onnx"):
            return None
        if kind in UNARY_HOMOGENEOUS or (kind == "Cast" and attr(node, "to") in FLOAT_CASTS):
            return [first] + [None] * (len(node.outputs) - 1) if first else None
        if kind == "Pow" and first and ins[1] is None:
            e = const_array(node.inputs[1])
            return [Scaled(first.scale, first.degree * float(e), first.rows)] if e is not None and e.size == 1 else None
        if kind == "Mul":
            return self._mul(node, ins)
        if kind == "Div" and first and ins[1] is None and self._broadcast_ok(node, 0):
            return [first]
        if kind in ("Add", "Sub"):
            return [first] if first and first.same_factor(ins[1]) else None
        if kind == "MatMul" and first and ins[1] is None:
            weight = const_tensor(node.inputs[1])
            return [first] if weight is not None and len(weight.shape) == 2 else None
        if kind == "Transpose" and first and first.rows is not None:
            perm = list(attr(node, "perm", range(rank - 1, -1, -1) if rank else []))
            if not perm:
                return None
            scale = self.edit.op1("Transpose", first.scale, perm=perm, hint="scale_t")
            return [Scaled(scale, first.degree, tuple(sorted(perm.index(r) for r in first.rows)))]
        if kind == "Reshape" and first and ins[1] is None:
            return self._reshape(node, first)
        if kind == "Slice" and first and not any(ins[1:]):
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                axes = const_array(node.inputs[3])
            else:       # no axes: the starts cover the leading axes
                starts = const_array(node.inputs[1])
                axes = None if starts is None else np.arange(np.atleast_1d(starts).size)
            return [first] if axes is not None and _off_rows(np.atleast_1d(axes), first, rank) else None
        if kind == "Split" and first and not any(ins[1:]):
            return [first] * len(node.outputs) if _off_rows([attr(node, "axis", 0)], first, rank) else None
        if kind == "Concat" and first and all(first.same_factor(s) for s in ins):
            return [first] if _off_rows([attr(node, "axis", 0)], first, rank) else None
        return None

    def _broadcast_ok(self, node: ir.Node, scaled_index: int) -> bool:
        """The unscaled operand does not add leading axes (which would move the rows)."""
        out_rank, in_rank = rank_of(node.outputs[0]), rank_of(node.inputs[scaled_index])
        if out_rank is not None and in_rank is not None:
            return out_rank == in_rank
        other = node.inputs[1 - scaled_index]
        other_rank = rank_of(other)
        if other_rank is None:
            c = const_array(other) if const_tensor(other) is None or const_tensor(other).size < 2**16 else None
            other_rank = None if c is None else c.ndim
        return other_rank is not None and in_rank is not None and other_rank <= in_rank

    def _mul(self, node, ins):
        a, b = ins[0], ins[1]
        if a and b:
            if a.scale is b.scale:
                return [Scaled(a.scale, a.degree + b.degree, a.rows)]
            return None
        index = 0 if a else 1
        return [a or b] if self._broadcast_ok(node, index) else None

    def _reshape(self, node: ir.Node, state: Scaled):
        """Keeps the scale when the row axes are an unchanged prefix of the shape."""
        src, dst = node.inputs[0].shape, node.outputs[0].shape
        if state.rows is None or src is None or dst is None:
            return None
        k = len(state.rows)
        if state.rows != tuple(range(k)) or len(dst) < k or len(src) < k:
            return None
        if not all(_same_dim(src[i], dst[i]) for i in range(k)):
            return None
        shape = self.edit.initializer(np.array([0] * k + [1] * (len(dst) - k), np.int64), "scale_shape")
        scale = self.edit.op1("Reshape", state.scale, shape, hint="scale_r")
        return [Scaled(scale, state.degree, state.rows)]

    # -- materialization ------------------------------------------------------------------
    def factor(self, state: Scaled, dtype: ir.DataType | None) -> ir.Value:
        key = (state.scale, state.degree, dtype)
        if key not in self._factor:
            f = state.scale
            if state.degree == 2:
                f = self.edit.op1("Mul", f, f, hint="scale_sq")
            elif state.degree != 1:
                f = self.edit.op1("Pow", f, self.edit.initializer(np.array(state.degree, np.float32), "degree"))
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
