"""The walk of a deferred scale downstream: as late as the algebra allows.

Instead of multiplying each linear's output by its 1/RMS right away, the walker moves the
factor through every op whose rule (rewriter/scale.py RULES) proves it passes, and applies it
(one Mul, rewriter/scale_muls.py) on the edge into the first op that does not. Where it must
stop although the algebra would pass (x·f(x) activations, attention) is rewriter/scale_stops.py.
Values read inside a subgraph (If/Loop/Scan bodies read outer values without listing them as
inputs) get the factor applied where they leave the main graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from rewriter.patterns.graph import GraphEditor, rank_of, reads_type_only, users
from rewriter.scale import Scaled, rule_for
from rewriter.scale_muls import ScaleMuls
from rewriter.scale_stops import activation_stops, attention_stops, cancel_blocker


@dataclass(frozen=True)
class Step:
    """One op a factor met: the scaled inputs it read and what the algebra did there."""

    node: ir.Node | None            # None: a graph output
    scaled: tuple[ir.Value, ...]
    verdict: str
    passed: bool


class ScaleWalker:
    """Moves each seeded factor (a linear's output = s ⊙ T) downstream through the ops whose
    rule (rewriter/scale.py) proves it passes, and has it applied (ScaleMuls) on the edge into
    the first op that does not, at a stop (rewriter/scale_stops.py), a norm that reads it, a
    subgraph or a graph output. The trace records every op a factor met."""

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
        self.stop_edges: dict[tuple[ir.Node, ir.Value], str] = {}   # apply the scale on these edges, because
        self.edit = edit
        self.take_output_slot = take_output_slot
        self.states: dict[ir.Value, Scaled] = {}
        self.muls = ScaleMuls(edit)
        self.trace: list[Step] = []     # every op a factor met, in graph order (`explain` prints it)

    def stop_at(self, nodes) -> None:
        """Apply any scale before these nodes (a norm's readers: one Mul on its input)."""
        self.stops.update(nodes)

    def cancel_in(self, norm_input: ir.Value, readers, axes: tuple[int, ...]) -> None:
        """Let the scale cancel in the norm whose nodes `readers` read `norm_input`, normalizing
        it over `axes` — only where the scale is constant over them (`cancel_blocker`)."""
        self.cancels.update(((node, norm_input), tuple(axes)) for node in readers)

    def seed(self, value: ir.Value, scale: ir.Value) -> None:
        rank = rank_of(value)
        self.states[value] = Scaled(scale, 1.0, None if rank is None else tuple(range(rank - 1)))

    # -- propagation ----------------------------------------------------------------------
    def run(self) -> None:
        self.graph.sort()
        if self.push:      # where the algebra would pass but onnxruntime's fusions need the scale to stop
            self.stop_edges.update(dict.fromkeys(activation_stops(self.graph), "applied at x of an x·f(x) "
                                                 "activation (kept whole for onnxruntime's fusion)"))
            self.stop_edges.update(dict.fromkeys(attention_stops(list(self.states)), "applied at the projection "
                                                 "bound for attention (kept out of onnxruntime's attention fusion)"))
        nodes = list(self.graph)        # the graph's own nodes: the walker's Muls are not walked
        for value, state in list(self.states.items()):
            self._apply_in_subgraphs(value, state)
        for node in nodes:
            ins = [self.states.get(v) if v is not None and not reads_type_only(node, i) else None
                   for i, v in enumerate(node.inputs)]
            scaled = tuple(v for v, st in zip(node.inputs, ins) if st is not None)
            for index, (value, state) in enumerate(zip(node.inputs, ins)):
                if state is not None and (node, value) in self.stop_edges:
                    self.trace.append(Step(node, (value,), self.stop_edges[node, value], False))
                    node.replace_input_with(index, self.muls.apply(value, state))
                    ins[index] = None
            if not any(ins):
                continue
            edges = [(v, st) for v, st in zip(node.inputs, ins) if st is not None]
            if all((node, v) in self.cancels for v, _ in edges):
                blocker = cancel_blocker(self.cancels, node, edges)
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
                applied = self.muls.apply(value, self.states[value])
                self.take_output_slot(value, applied)

    def _apply_before(self, node: ir.Node, ins: list[Scaled | None]) -> None:
        for index, state in enumerate(ins):
            if state is not None:
                node.replace_input_with(index, self.muls.apply(node.inputs[index], state))

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
                node.replace_input_with(index, self.muls.apply(value, state))
